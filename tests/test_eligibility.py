"""Eligibility rules: cooldowns and daily caps over the tips a user was shown lately."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.factories import local_service, task, tip_body
from tests.test_store import raw_sql
from tipgraph.candidates import Candidate
from tipgraph.contracts import TipRequest
from tipgraph.eligibility import NONE_ELIGIBLE, eligible
from tipgraph.settings import EligibilitySettings, StoreSettings, TipgraphSettings
from tipgraph.store import open_store

NOW = 1_780_000_000.0
H = 3600.0


def tip(candidate_id: str, kind: str) -> Candidate:
    return Candidate(candidate_id, kind, f"tip {candidate_id}", "tasks", ())


CANDIDATES = [tip("a", "focus"), tip("b", "focus"), tip("c", "plan_day"), tip("d", "batch")]


@pytest.mark.parametrize(
    ("settings", "exposures", "kept", "removed"),
    [
        # Off: nothing is removed, whatever was shown.
        ({}, [("a", "focus", NOW - 60)], "abcd", {}),
        # The same tip within its cooldown, not after it.
        ({"tip_cooldown_h": 2}, [("a", "focus", NOW - H)], "bcd", {"tip_cooldown": 1}),
        ({"tip_cooldown_h": 2}, [("a", "focus", NOW - 3 * H)], "abcd", {}),
        # A kind within its own cooldown; other kinds have none.
        ({"kind_cooldown_h": {"focus": 12}}, [("x", "focus", NOW - H)], "cd", {"kind_cooldown": 2}),
        ({"kind_cooldown_h": {"focus": 12}}, [("x", "plan_day", NOW - H)], "abcd", {}),
        # A daily cap counts the last 24 hours only.
        (
            {"daily_caps": {"batch": 2}},
            [("d", "batch", NOW - H), ("y", "batch", NOW - 2 * H)],
            "abc",
            {"daily_cap": 1},
        ),
        (
            {"daily_caps": {"batch": 2}},
            [("d", "batch", NOW - H), ("y", "batch", NOW - 25 * H)],
            "abcd",
            {},
        ),
        # Each removed candidate counts under the first rule that removes it.
        (
            {"tip_cooldown_h": 2, "kind_cooldown_h": {"focus": 2}},
            [("a", "focus", NOW - H)],
            "cd",
            {"tip_cooldown": 1, "kind_cooldown": 1},
        ),
    ],
)
def test_each_rule_removes_exactly_what_it_says(
    settings: dict[str, object],
    exposures: list[tuple[str, str, float]],
    kept: str,
    removed: dict[str, int],
) -> None:
    answer, fired = eligible(CANDIDATES, exposures, EligibilitySettings(**settings), NOW)
    assert "".join(c.candidate_id for c in answer) == kept
    assert fired == removed


def test_when_nothing_is_eligible_everything_stays_and_that_is_recorded() -> None:
    shown = [(c.candidate_id, c.kind, NOW - 60) for c in CANDIDATES]
    answer, fired = eligible(CANDIDATES, shown, EligibilitySettings(tip_cooldown_h=1), NOW)
    assert answer == CANDIDATES and fired == {NONE_ELIGIBLE: 1}


def test_the_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="every value must be > 0"):
        EligibilitySettings(daily_caps={"batch": 0})
    with pytest.raises(ValueError, match=r"kind_cooldown_h\.reading"):
        EligibilitySettings(kind_cooldown_h={"reading": 2})
    assert EligibilitySettings(kind_cooldown_h={"focus": 36}).lookback_h == 36
    assert EligibilitySettings(daily_caps={"focus": 1}, tip_cooldown_h=2).lookback_h == 24
    assert not EligibilitySettings().enabled


async def test_the_served_tip_is_not_served_again_within_the_cooldown(
    store_settings: StoreSettings, tmp_path: Path
) -> None:
    """Through the tip loop on both stores: exposures read from the decision log, the
    rules applied before scoring, and what fired recorded with the decision."""
    settings = TipgraphSettings(
        store=store_settings.model_dump(),
        shadows=[],
        eligibility={"tip_cooldown_h": 6, "daily_caps": {"plan_day": 1}},
    )
    tasks = [task("t1", "Write the report", priority=4), task("t2", "email")]
    with open_store(settings.store) as store:
        service = local_service(settings, store)
        served = []
        for _ in range(4):
            answer = await service.tip(TipRequest(**tip_body(user_id="u", tasks=tasks)))
            served.append((answer.event_id, answer.tip.candidate_id, answer.tip.kind))
            await service.log.flush()  # the next request reads this decision as shown
        await service.close()
    recorded = dict(raw_sql(settings.store, "SELECT event_id, eligibility FROM decisions"))
    rules = [recorded[event_id] for event_id, _, _ in served]
    ids = [candidate_id for _, candidate_id, _ in served]
    assert len(set(ids)) == len(ids), ids  # never the same tip twice within 6 hours
    assert [kind for _, _, kind in served].count("plan_day") <= 1
    assert rules[0] is None  # nothing shown before the first
    assert all(r is not None and json.loads(r)["tip_cooldown"] >= 1 for r in rules[1:]), rules
