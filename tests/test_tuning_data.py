"""Logged data from a real decision log, written by the real service (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tipgraph.settings import TipgraphSettings
from tipgraph.simulator import run_local
from tipgraph.store import LogFilter, open_store
from tuning.data import load_log


def test_decision_log_loads_as_a_logged_bandit(tmp_path: Path) -> None:
    settings = TipgraphSettings(store={"url": f"sqlite:///{tmp_path}/log.db"})
    run_local(settings, users=5, decisions=60, seed=1, block=60)
    with open_store(settings.store) as store:
        log = load_log(store)
        decisions = {e.event_id: e for e in store.logged_events()}
    assert log.n_events == 60 and log.dim == len(next(iter(decisions.values())).features[0])
    for i in (0, 17, 59):
        X_i, p_i, a_i, r_i = log.event(i)
        logged = decisions[str(log.event_id[i])]
        assert p_i.sum() == pytest.approx(1.0)
        assert a_i == logged.chosen and r_i == logged.reward
        np.testing.assert_array_equal(X_i, np.array(logged.features))
    assert (np.diff(log.timestamp.astype("int64")) >= 0).all()

    with open_store(settings.store) as store, pytest.raises(ValueError, match="no logged"):
        load_log(store, LogFilter(policy_name="nobody"))
