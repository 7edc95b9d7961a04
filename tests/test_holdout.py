"""The on-policy holdout: stable assignment, holdout decisions logged as such, lift."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from tests.factories import local_service, tip_body
from tipgraph.contracts import TipRequest
from tipgraph.holdout import Holdout, holdout_share
from tipgraph.settings import ExperimentSettings, TipgraphSettings
from tipgraph.simulator import run_local
from tipgraph.store import open_store
from tipgraph.store.records import LoggedEvent
from tuning.report import configured_policies, render_from_store
from tuning.report_data import holdout_lift

KEYS = [f"user-key-{i}" for i in range(20_000)]


def test_the_assignment_is_stable_keyed_and_the_configured_share() -> None:
    holdout = Holdout(ExperimentSettings(holdout_fraction=0.2), 4)
    members = {k for k in KEYS if holdout.contains(k)}
    assert abs(len(members) / len(KEYS) - 0.2) < 0.01
    # The same answer from another replica (another object), and after a restart.
    again = Holdout(ExperimentSettings(holdout_fraction=0.2), 4)
    assert members == {k for k in KEYS if again.contains(k)}
    # A larger holdout keeps everyone who was in, and a new salt draws a new one.
    larger = Holdout(ExperimentSettings(holdout_fraction=0.3), 4)
    assert members < {k for k in KEYS if larger.contains(k)}
    resalted = Holdout(ExperimentSettings(holdout_fraction=0.2, holdout_salt="2"), 4)
    overlap = len(members & {k for k in KEYS if resalted.contains(k)}) / len(members)
    assert 0.1 < overlap < 0.3  # independent draws overlap by about the fraction
    assert not any(Holdout(ExperimentSettings(), 4).contains(k) for k in KEYS[:100])
    assert 0 <= holdout_share("k", "s") < 1


def test_the_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"less than or equal to 0\.5"):
        ExperimentSettings(holdout_fraction=0.6)
    with pytest.raises(ValueError, match="policy names must be unique"):
        TipgraphSettings(
            policy={"name": "holdout_uniform", "kind": "linucb"},
            experiment={"holdout_fraction": 0.1},
        )


async def test_holdout_users_are_served_and_logged_by_the_holdout_policy(
    tmp_path: Path,
) -> None:
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{tmp_path}/log.db"},
        shadows=[],
        experiment={"holdout_fraction": 0.5, "holdout_policy": "uniform"},
    )
    with open_store(settings.store) as store:
        service = local_service(settings, store)
        answers = {}
        for i in range(40):
            user = f"u{i}"
            answers[user] = await service.tip(TipRequest(**tip_body(user_id=user)))
        in_holdout = {u for u in answers if service.holdout.contains(service.user_key(u))}
        await service.close()
    assert 5 < len(in_holdout) < 35
    for user, answer in answers.items():
        if user in in_holdout:
            assert answer.policy.name == "holdout_uniform"
            probabilities = [r.probability for r in answer.ranking]
            assert probabilities == pytest.approx([1 / len(probabilities)] * len(probabilities))
        else:
            assert answer.policy.name == settings.policy.name


def event(policy: str, reward: float, day: int) -> LoggedEvent:
    return LoggedEvent(
        event_id=f"{policy}-{reward}-{day}",
        created_at=datetime(2026, 3, 1, 12, tzinfo=UTC) + timedelta(days=day),
        policy_name=policy,
        prompt_version=None,
        features=[[1.0]],
        probabilities=[1.0],
        chosen=0,
        reward=reward,
        reward_source="feedback",
        reward_id=1,
        feature_version="f",
    )


def test_lift_is_the_difference_of_realised_means_with_welchs_interval() -> None:
    bandit = [1.0, 1.0, 0.0, 1.0]  # day 0: 0.75
    held = [0.0, 1.0, 0.0, 0.0]  # day 0: 0.25
    events = [event("linucb", r, 0) for r in bandit] + [
        event("holdout_uniform", r, 0) for r in held
    ]
    events += [event("linucb", r, 1) for r in (1.0, 0.0)] + [event("holdout_uniform", 0.0, 1)]
    overall, day0 = holdout_lift(events)  # day 1 has one holdout decision: left out
    assert (overall.day, day0.day) == (None, "2026-03-01")
    assert day0.lift == pytest.approx(0.5)
    se = np.sqrt(np.var(bandit, ddof=1) / 4 + np.var(held, ddof=1) / 4)
    assert (day0.lower, day0.upper) == pytest.approx((0.5 - 1.959964 * se, 0.5 + 1.959964 * se))
    assert (overall.n_bandit, overall.n_holdout) == (6, 5)
    assert holdout_lift([event("linucb", 1.0, 0)] * 3) == []


def test_the_report_shows_the_bandits_lift_over_a_uniform_holdout(tmp_path: Path) -> None:
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{tmp_path}/log.db"},
        shadows=[],
        experiment={"holdout_fraction": 0.3},
        policy={"name": "linucb", "kind": "linucb", "alpha": 0.5},
    )
    run_local(settings, users=50, decisions=2000, seed=7, block=2000)
    report, _ = render_from_store(
        settings.store, tmp_path / "out", expected=configured_policies(settings)
    )
    overall = report.lift[0]
    assert overall.day is None and overall.n_holdout > 300 and overall.n_bandit > 1000
    assert overall.lower > 0  # the bandit earns more than uniform, with confidence
    numbers = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert numbers["lift"][0]["lift"] == pytest.approx(overall.lift)
    html = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "On-policy lift over the holdout" in html
