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


def test_events_of_the_earlier_layout_are_carried_over_and_unknown_ones_left_out() -> None:
    from datetime import UTC, datetime

    from tipgraph.features import EARLIER_LAYOUTS, FEATURE_SPEC, RECENCY_FEATURE
    from tipgraph.store.records import LoggedEvent
    from tuning.data import on_layout

    (earlier,) = EARLIER_LAYOUTS

    def event(event_id: str, version: str, dim: int) -> LoggedEvent:
        rows = [[float(i + 1)] * dim for i in range(3)]
        at = datetime(2026, 12, 1, tzinfo=UTC)
        return LoggedEvent(
            event_id, at, "served", None, rows, [0.5, 0.25, 0.25], 1, 1.0, "feedback", 1, version
        )

    events = [
        event("old", earlier.version, earlier.dim),
        event("new", FEATURE_SPEC.version, FEATURE_SPEC.dim),
        event("stray", "v1-gone", 5),
    ]
    kept = on_layout(events, FEATURE_SPEC.version)
    assert [e.event_id for e in kept] == ["old", "new"]
    assert {e.feature_version for e in kept} == {FEATURE_SPEC.version}
    column = FEATURE_SPEC.names.index(RECENCY_FEATURE)
    assert [len(row) for row in kept[0].features] == [FEATURE_SPEC.dim] * 3
    assert [row[column] for row in kept[0].features] == [0.0, 0.0, 0.0]
    assert sum(kept[0].features[1]) == 2.0 * earlier.dim
    # Asked for the earlier layout itself, only its own events qualify.
    assert [e.event_id for e in on_layout(events, earlier.version)] == ["old"]


def test_the_training_log_read_a_page_at_a_time_is_the_log_read_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from functools import partialmethod

    from tipgraph.features import FEATURE_SPEC
    from tipgraph.store import SQLiteStore
    from tuning.data import from_events, load_training_log

    settings = TipgraphSettings(store={"url": f"sqlite:///{tmp_path}/log.db"})
    run_local(settings, users=5, decisions=50, seed=3, block=50)
    with open_store(settings.store) as store:
        whole = from_events(store.logged_events())
        pages = [len(page) for page in store.logged_event_pages(page_size=7)]
        assert pages == [7] * 7 + [1]
        with pytest.raises(ValueError, match="page_size"):
            next(store.logged_event_pages(page_size=0))
        monkeypatch.setattr(
            SQLiteStore,
            "logged_event_pages",
            partialmethod(SQLiteStore.logged_event_pages, page_size=7),
        )
        paged = load_training_log(store, feature_version=FEATURE_SPEC.version)
        newest = max(e.reward_id for e in store.logged_events())
    assert paged.trained_through_reward_id == newest
    for name in ("X", "offsets", "pscore", "chosen", "reward", "event_id", "timestamp"):
        np.testing.assert_array_equal(getattr(paged.log, name), getattr(whole, name))
    assert paged.log.X.dtype == np.float64 and paged.log.event_id.dtype.kind == "U"
