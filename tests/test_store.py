"""The decision store against real databases: every behaviour runs on SQLite and Postgres."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

import tipgraph.store.migrate as migrate_module
from tipgraph.retention import apply_retention
from tipgraph.settings import StoreSettings, TipgraphSettings
from tipgraph.store import (
    CandidateRecord,
    DecisionRecord,
    DecisionStore,
    EventErased,
    ExpiredRows,
    FeedbackRecord,
    LogFilter,
    MigrationError,
    PolicyScoresEntry,
    PolicyScoresRecord,
    PostgresStore,
    SQLiteStore,
    StoreCounts,
    StoreError,
    StoreUnavailable,
    make_store,
    open_store,
)
from tipgraph.store._rows import utc_datetime
from tipgraph.store.migrate import split_sqlite_script
from tipgraph.store.sqlite import sqlite_path

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)

# Floats that a lossy path (float32, str(), numeric rounding, JSONB printing 1e300 as an
# integer) would change.
FEATURES = [
    [0.1, 1 / 3, -2.5e-7, 5e-324],
    [1e300, 123456789.123456789, 2.0**-40, -0.0],
    [-1.5, 1.7976931348623157e308, 7.0, 0.30000000000000004],
]
KINDS = ["focus", "break", "plan"]


def make_decision(
    event_id: str,
    *,
    user_key: str = "user-a",
    created_at: datetime = T0,
    chosen: int = 1,
    content: str = "Take a short walk",
    latency_ms: dict[str, float] | None = None,
) -> DecisionRecord:
    candidates = [
        CandidateRecord(
            candidate_id=f"c{i}",
            position=i,
            kind=KINDS[i],
            source="llm" if i else "template",
            content=f"{content} #{i}",
            task_ref="task-7" if i == 1 else None,
            model="gpt-test" if i else None,
            prompt_version="p3" if i else None,
            features=list(FEATURES[i]),
        )
        for i in range(3)
    ]
    probabilities = [0.1, 0.7, 0.2]
    return DecisionRecord(
        event_id=event_id,
        user_key=user_key,
        created_at=created_at,
        policy_name="linucb",
        policy_version="v1",
        feature_version="f1",
        prompt_version="p3",
        generation_source="llm",
        chosen_candidate_id=f"c{chosen}",
        chosen_kind=KINDS[chosen],
        chosen_probability=probabilities[chosen],
        latency_ms={"context": 1.5, "generation": 20.25, "scoring": 0.75, "total": 23.0}
        if latency_ms is None
        else latency_ms,
        candidates=candidates,
        served=PolicyScoresRecord(
            policy_name="linucb",
            policy_version="v1",
            role="served",
            scores=[0.25, 1.5, -0.5],
            probabilities=probabilities,
            chosen_candidate_id=f"c{chosen}",
            chosen_probability=probabilities[chosen],
            latency_ms=0.75,
        ),
    )


def make_shadow(*, error: str | None = None) -> PolicyScoresRecord:
    if error is not None:
        return PolicyScoresRecord(
            policy_name="egreedy",
            policy_version="v2",
            role="shadow",
            scores=[],
            probabilities=[],
            chosen_candidate_id=None,
            chosen_probability=None,
            latency_ms=5000.0,
            error=error,
        )
    return PolicyScoresRecord(
        policy_name="egreedy",
        policy_version="v2",
        role="shadow",
        scores=[0.5, -1.25, 3.0],
        probabilities=[0.025, 0.025, 0.95],
        chosen_candidate_id="c2",
        chosen_probability=0.95,
        latency_ms=2.5,
    )


CANDIDATE_IDS = ["c0", "c1", "c2"]


def make_feedback(
    event_id: str, reaction: str = "done", reward: float = 1.0, *, at: datetime = T0
) -> FeedbackRecord:
    return FeedbackRecord(
        event_id=event_id,
        reaction=reaction,
        value=None,
        reward=reward,
        reacted_at=at + timedelta(minutes=1),
        received_at=at + timedelta(minutes=1, seconds=2),
    )


def received(event_id: str, received_at: datetime, reward: float = 1.0) -> FeedbackRecord:
    """Feedback received at an exact time, for tests of the reward wait."""
    return FeedbackRecord(
        event_id=event_id,
        reaction="done",
        value=None,
        reward=reward,
        reacted_at=received_at,
        received_at=received_at,
    )


def raw_sql(settings: StoreSettings, statement: str) -> list[tuple[Any, ...]]:
    """Run SQL on the store's database directly, for columns the store API never returns."""
    if settings.url.startswith("sqlite"):
        with closing(sqlite3.connect(sqlite_path(settings.url), isolation_level=None)) as conn:
            return conn.execute(statement).fetchall()
    with psycopg.connect(settings.url, autocommit=True) as conn:
        if settings.pg_schema is not None:
            conn.execute(
                sql.SQL("SET search_path TO {}").format(sql.Identifier(settings.pg_schema))
            )
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def _sql_literal(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def write_schema1_decision(settings: StoreSettings, decision: DecisionRecord) -> None:
    """What release 1 wrote for a decision: one row per candidate and per score, the
    features as JSON (the layout migration 0009 compacts)."""
    latency = [decision.latency_ms.get(k) for k in ("context", "generation", "scoring", "total")]
    values = [
        decision.event_id, decision.user_key,
        decision.created_at.isoformat(timespec="microseconds"), decision.policy_name,
        decision.policy_version, decision.feature_version, decision.prompt_version,
        decision.generation_source, decision.chosen_candidate_id, decision.chosen_kind,
        decision.chosen_probability, *latency, "[1.0, 0.5]",
    ]  # fmt: skip
    statements = [f"INSERT INTO decisions VALUES ({', '.join(map(_sql_literal, values))})"]
    for c in decision.candidates:
        row = [
            decision.event_id, c.candidate_id, c.position, c.kind, c.source, c.content,
            c.task_ref, c.model, c.prompt_version, json.dumps(c.features),
        ]  # fmt: skip
        statements.append(f"INSERT INTO candidates VALUES ({', '.join(map(_sql_literal, row))})")
    served = decision.served
    run = [
        decision.event_id, served.policy_name, served.policy_version, "served",
        served.chosen_candidate_id, served.chosen_probability, served.latency_ms, None,
        decision.created_at.isoformat(timespec="microseconds"),
    ]  # fmt: skip
    statements.append(f"INSERT INTO policy_runs VALUES ({', '.join(map(_sql_literal, run))})")
    for c, score, p in zip(decision.candidates, served.scores, served.probabilities, strict=True):
        row = [decision.event_id, served.policy_name, c.candidate_id, score, p]
        statements.append(f"INSERT INTO tip_scores VALUES ({', '.join(map(_sql_literal, row))})")
    for statement in statements:
        raw_sql(settings, statement)


# --- migrations --------------------------------------------------------------------------------


def test_migrations_are_applied_once(store: DecisionStore, store_settings: StoreSettings) -> None:
    assert store.schema_version() == 12
    store.open()  # open() on an open store is a no-op
    with open_store(store_settings) as again:
        assert again.schema_version() == 12
    assert raw_sql(
        store_settings, "SELECT version, name FROM schema_migrations ORDER BY version"
    ) == [
        (1, "initial"),
        (2, "rewards"),
        (3, "generation"),
        (4, "erasure"),
        (5, "tombstones"),
        (6, "candidate_pool"),
        (7, "eligibility"),
        (8, "retention_indexes"),
        (9, "compact_log"),
        (10, "partitioned_decisions"),
        (11, "reaction_history"),
        (12, "decision_outbox"),
    ]
    assert store.counts() == StoreCounts(by_role={"served": 0, "shadow": 0})


def test_a_version_1_database_gets_its_feedback_backfilled_into_rewards(
    store_settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = migrate_module.load_migrations
    monkeypatch.setattr(migrate_module, "load_migrations", lambda dialect: shipped(dialect)[:1])
    with open_store(store_settings) as old:
        assert old.schema_version() == 1
    for decision in (make_decision("e1", chosen=0), make_decision("e2", chosen=2)):
        write_schema1_decision(store_settings, decision)
    # What release 1 wrote: feedback rows only, in another order than the decisions, and
    # one for an event whose decision was never logged.
    times = {"e2": T0 + timedelta(minutes=1), "e9": T0 + timedelta(minutes=2)}
    times["e1"] = T0 + timedelta(minutes=3)
    for event_id, reward in [("e2", 0.25), ("e9", 1.0), ("e1", 0.0)]:
        stamp = times[event_id].isoformat(timespec="microseconds")
        raw_sql(
            store_settings,
            "INSERT INTO feedback (event_id, reaction, value, reward, reacted_at, received_at) "
            f"VALUES ('{event_id}', 'done', NULL, {reward}, '{stamp}', '{stamp}')",
        )
    monkeypatch.undo()

    with open_store(store_settings) as upgraded:
        assert upgraded.schema_version() == 12
        events = upgraded.training_events()
        assert [(e.event_id, e.reward, e.source) for e in events] == [
            ("e2", 0.25, "feedback"),
            ("e1", 0.0, "feedback"),
        ]
        assert [e.features for e in events] == [FEATURES[2], FEATURES[0]]
        assert events[0].reward_id < events[1].reward_id

        rows = raw_sql(
            store_settings, "SELECT event_id, created_at FROM rewards ORDER BY reward_id"
        )
        assert [(event_id, utc_datetime(at)) for event_id, at in rows] == [
            ("e2", times["e2"]),
            ("e1", times["e1"]),
        ]
        learned = raw_sql(
            store_settings, "SELECT event_id, learned FROM feedback ORDER BY feedback_id"
        )
        assert [(event_id, bool(flag)) for event_id, flag in learned] == [
            ("e2", True),
            ("e9", False),  # no decision, so it could never train and has no reward
            ("e1", True),
        ]

        retry = upgraded.record_feedback(make_feedback("e2", "dismiss", 0.0))
        assert (retry.created, retry.learned, retry.reward_id) == (False, True, events[0].reward_id)
        assert retry.record.reward == 0.25
        orphan = upgraded.record_feedback(make_feedback("e9"))
        assert (orphan.created, orphan.learned, orphan.reward_id) == (False, False, None)
        counts = upgraded.counts()
        assert (counts.feedback, counts.rewards, counts.default_rewards) == (3, 2, 0)


def test_a_newer_schema_is_refused(store: DecisionStore, store_settings: StoreSettings) -> None:
    raw_sql(store_settings, "INSERT INTO schema_migrations (version, name) VALUES (999, 'future')")
    newer = make_store(store_settings)
    with pytest.raises(MigrationError, match="version 999"):
        newer.open()
    with pytest.raises(StoreError, match="not open"):
        newer.counts()


def test_split_sqlite_script_respects_quotes_comments_and_triggers() -> None:
    script = """
        -- leading comment; with a semicolon
        CREATE TABLE a (x TEXT DEFAULT 'semi;colon');
        CREATE TABLE b (y INTEGER); CREATE TABLE c (z INTEGER);
        CREATE TRIGGER t AFTER INSERT ON a BEGIN INSERT INTO b VALUES (1); END;
        -- trailing comment
    """
    statements = split_sqlite_script(script)
    assert [s.split("(")[0].split()[-1] for s in statements[:3]] == ["a", "b", "c"]
    assert statements[3].startswith("CREATE TRIGGER") and statements[3].endswith("END;")
    assert len(statements) == 4
    with pytest.raises(MigrationError, match="incomplete"):
        split_sqlite_script("CREATE TABLE d (x TEXT DEFAULT 'unterminated);")


# --- decisions ---------------------------------------------------------------------------------


def test_write_decisions_round_trip(store: DecisionStore) -> None:
    store.write_decisions([make_decision("e1", chosen=1), make_decision("e2", chosen=2)])

    stored = store.get_decision("e1")
    assert stored is not None
    assert stored.event_id == "e1"
    assert stored.user_key == "user-a"
    assert stored.created_at == T0
    assert (stored.policy_name, stored.policy_version) == ("linucb", "v1")
    assert (stored.chosen_candidate_id, stored.chosen_kind) == ("c1", "break")
    assert stored.chosen_probability == 0.7
    assert stored.chosen_features == FEATURES[1]
    assert all(type(value) is float for value in stored.chosen_features)

    other = store.get_decision("e2")
    assert other is not None and other.chosen_features == FEATURES[2]
    assert store.get_decision("unknown") is None

    counts = store.counts()
    assert (counts.decisions, counts.candidates, counts.policy_runs) == (2, 6, 2)
    assert counts.by_role == {"served": 2, "shadow": 0}
    # Every candidate as it was written, texts and features, in position order.
    assert store.decision_candidates("e1") == make_decision("e1").candidates
    assert store.decision_candidates("unknown") == []


def test_missing_latency_stages_are_null(
    store: DecisionStore, store_settings: StoreSettings
) -> None:
    store.write_decisions([make_decision("e1", latency_ms={"total": 12.5, "ingress": 1.0})])
    assert raw_sql(
        store_settings,
        "SELECT latency_context_ms, latency_generation_ms, latency_scoring_ms, "
        "latency_total_ms FROM decisions",
    ) == [(None, None, None, 12.5)]


def test_writing_a_decision_again_changes_nothing(store: DecisionStore) -> None:
    store.write_decisions([make_decision("e1")])
    before = store.counts()
    store.write_decisions([make_decision("e1")])
    store.write_decisions([make_decision("e1"), make_decision("e1")])
    assert store.counts() == before
    assert before.decisions == 1 and before.candidates == 3 and before.policy_runs == 1


def test_an_invalid_batch_writes_nothing(store: DecisionStore) -> None:
    bad = replace(make_decision("e2"), chosen_candidate_id="nope")
    with pytest.raises(ValueError, match="not one of the candidates"):
        store.write_decisions([make_decision("e1"), bad])
    naive = replace(make_decision("e3"), created_at=datetime(2024, 5, 1, 12, 0))
    with pytest.raises(ValueError, match="timezone-aware"):
        store.write_decisions([naive])
    assert store.counts().decisions == 0


# --- policy scores -----------------------------------------------------------------------------


def test_shadow_probabilities_are_stored_per_candidate_and_idempotent(
    store: DecisionStore, store_settings: StoreSettings
) -> None:
    store.write_decisions([make_decision("e1")])
    store.write_policy_scores("e1", [make_shadow()], CANDIDATE_IDS)
    store.write_policy_scores("e1", [make_shadow()], CANDIDATE_IDS)
    store.record_feedback(make_feedback("e1"))

    counts = store.counts()
    assert counts.policy_runs == 2
    assert counts.by_role == {"served": 1, "shadow": 1}
    (logged,) = store.logged_policy_runs()
    assert [(r.policy_name, r.role, r.probabilities, r.chosen) for r in logged.runs] == [
        ("egreedy", "shadow", [0.025, 0.025, 0.95], 2),
        ("linucb", "served", [0.1, 0.7, 0.2], 1),
    ]
    assert raw_sql(
        store_settings,
        "SELECT role, chosen_candidate_id, chosen_probability, latency_ms, error "
        "FROM policy_runs WHERE policy_name = 'egreedy'",
    ) == [("shadow", "c2", 0.95, 2.5, None)]


def test_shadow_scores_may_arrive_before_the_decision(store: DecisionStore) -> None:
    store.write_policy_scores("e1", [make_shadow()], CANDIDATE_IDS)
    assert store.get_decision("e1") is None
    store.write_decisions([make_decision("e1")])

    counts = store.counts()
    assert (counts.decisions, counts.policy_runs) == (1, 2)
    assert counts.by_role == {"served": 1, "shadow": 1}


def test_a_batch_writes_decisions_and_shadow_rows_in_one_transaction(
    store: DecisionStore,
) -> None:
    store.write_batch(
        [make_decision("e1"), make_decision("e2")],
        [PolicyScoresEntry(e, [make_shadow()], CANDIDATE_IDS) for e in ("e1", "e2")],
    )
    counts = store.counts()
    assert (counts.decisions, counts.policy_runs) == (2, 4)
    assert counts.by_role == {"served": 2, "shadow": 2}

    # One bad entry fails the whole batch: the decision log keeps it and retries it whole.
    with pytest.raises(ValueError, match="expected 2 scores"):
        store.write_batch(
            [make_decision("e3")], [PolicyScoresEntry("e3", [make_shadow()], ["c0", "c1"])]
        )
    assert store.get_decision("e3") is None
    assert store.counts().policy_runs == 4


def test_a_failed_shadow_is_logged_without_scores(
    store: DecisionStore, store_settings: StoreSettings
) -> None:
    store.write_policy_scores("e1", [make_shadow(error="TimeoutError: 5s")], CANDIDATE_IDS)
    counts = store.counts()
    assert (counts.policy_runs, counts.by_role["shadow"]) == (1, 1)
    assert raw_sql(store_settings, "SELECT error, probabilities FROM policy_runs") == [
        ("TimeoutError: 5s", None)
    ]


def test_scores_must_align_with_candidates(store: DecisionStore) -> None:
    with pytest.raises(ValueError, match="expected 2 scores"):
        store.write_policy_scores("e1", [make_shadow()], ["c0", "c1"])
    assert store.counts().policy_runs == 0


# --- feedback ----------------------------------------------------------------------------------


def test_the_first_feedback_wins(store: DecisionStore) -> None:
    store.write_decisions([make_decision("e1")])
    first = make_feedback("e1", "snooze", 0.25)

    outcome = store.record_feedback(first)
    assert outcome.created is True
    assert outcome.record == first
    assert outcome.learned is True and outcome.reward_id is not None

    retry = store.record_feedback(make_feedback("e1", "dismiss", 0.0, at=T0 + timedelta(hours=1)))
    assert retry.created is False
    assert retry.record == first
    assert (retry.learned, retry.reward_id) == (True, outcome.reward_id)
    counts = store.counts()
    assert (counts.feedback, counts.rewards, counts.default_rewards) == (1, 1, 0)
    assert [(e.reward_id, e.reward) for e in store.training_events()] == [(outcome.reward_id, 0.25)]


def test_feedback_is_validated(store: DecisionStore) -> None:
    with pytest.raises(ValueError, match="reaction must be one of"):
        store.record_feedback(make_feedback("e1", "love"))
    naive = replace(make_feedback("e1"), received_at=datetime(2024, 5, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        store.record_feedback(naive)
    assert store.counts().feedback == 0


def test_training_events_follow_reward_order(store: DecisionStore) -> None:
    store.write_decisions([make_decision(f"e{i}", chosen=i % 3) for i in range(4)])
    # Feedback in another order than the decisions; e9 has no decision and cannot train.
    outcomes = {
        event_id: store.record_feedback(make_feedback(event_id, reward=reward))
        for event_id, reward in [("e2", 1.0), ("e9", 1.0), ("e0", 0.0), ("e3", 0.25), ("e1", 1.0)]
    }
    assert all(outcome.created for outcome in outcomes.values())
    assert (outcomes["e9"].learned, outcomes["e9"].reward_id) == (False, None)

    events = store.training_events()
    assert [e.event_id for e in events] == ["e2", "e0", "e3", "e1"]
    assert [e.reward for e in events] == [1.0, 0.0, 0.25, 1.0]
    assert [e.features for e in events] == [FEATURES[2], FEATURES[0], FEATURES[0], FEATURES[1]]
    assert {e.source for e in events} == {"feedback"}
    ids = [e.reward_id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert ids == [outcomes[e.event_id].reward_id for e in events]

    assert [e.event_id for e in store.training_events(after_reward_id=ids[1])] == ["e3", "e1"]
    assert store.training_events(after_reward_id=ids[-1]) == []


# --- rewards -----------------------------------------------------------------------------------


def test_feedback_within_the_wait_is_learned_once(store: DecisionStore) -> None:
    store.write_decisions([make_decision("e1", chosen=2)])
    # Exactly at the limit still counts as in time.
    outcome = store.record_feedback(
        received("e1", T0 + timedelta(seconds=60), reward=0.75), learn_within_s=60
    )
    assert (outcome.created, outcome.learned) == (True, True)
    assert outcome.reward_id is not None

    events = store.training_events()
    assert [(e.reward_id, e.event_id, e.reward, e.source) for e in events] == [
        (outcome.reward_id, "e1", 0.75, "feedback")
    ]
    assert events[0].features == FEATURES[2]

    before = store.counts()
    retry = store.record_feedback(
        received("e1", T0 + timedelta(seconds=61), reward=0.0), learn_within_s=60
    )
    assert retry == replace(outcome, created=False)
    assert store.counts() == before
    assert (before.feedback, before.rewards, before.default_rewards) == (1, 1, 0)
    assert store.training_events() == events


def test_feedback_after_the_wait_is_stored_but_not_learned(
    store: DecisionStore, store_settings: StoreSettings
) -> None:
    store.write_decisions([make_decision("e1")])
    late = received("e1", T0 + timedelta(seconds=61))
    outcome = store.record_feedback(late, learn_within_s=60)
    assert (outcome.created, outcome.learned, outcome.reward_id) == (True, False, None)
    assert outcome.record == late
    assert store.training_events() == []
    counts = store.counts()
    assert (counts.feedback, counts.rewards) == (1, 0)
    assert [bool(flag) for (flag,) in raw_sql(store_settings, "SELECT learned FROM feedback")] == [
        False
    ]
    # A retry inside the wait does not turn the stored, late feedback into a reward.
    retry = store.record_feedback(received("e1", T0), learn_within_s=60)
    assert (retry.created, retry.learned, retry.reward_id) == (False, False, None)
    assert store.counts().rewards == 0


def test_feedback_without_a_decision_is_stored_but_not_learned(store: DecisionStore) -> None:
    outcome = store.record_feedback(make_feedback("ghost"))
    assert (outcome.created, outcome.learned, outcome.reward_id) == (True, False, None)
    assert store.counts().feedback == 1 and store.training_events() == []


@pytest.mark.parametrize("wait", [-1.0, math.nan])
def test_learn_within_s_is_validated(store: DecisionStore, wait: float) -> None:
    store.write_decisions([make_decision("e1")])
    with pytest.raises(ValueError, match="learn_within_s"):
        store.record_feedback(make_feedback("e1"), learn_within_s=wait)
    assert store.counts().feedback == 0


def test_default_rewards_go_to_old_unrewarded_decisions_oldest_first(
    store: DecisionStore, store_settings: StoreSettings
) -> None:
    # Written in another order than they were made: defaults follow created_at.
    store.write_decisions(
        [make_decision(f"d{i}", created_at=T0 + timedelta(minutes=i)) for i in (3, 0, 4, 1, 2)]
        + [make_decision("fresh", created_at=T0 + timedelta(minutes=30))]
    )
    now = T0 + timedelta(hours=2)
    cutoff = T0 + timedelta(minutes=30)  # strictly before: "fresh" is not old enough yet

    assert store.apply_default_rewards(older_than=cutoff, reward=-0.5, now=now, limit=2) == 2
    assert [e.event_id for e in store.training_events()] == ["d0", "d1"]
    assert store.apply_default_rewards(older_than=cutoff, reward=-0.5, now=now, limit=0) == 0
    assert store.apply_default_rewards(older_than=cutoff, reward=-0.5, now=now) == 3
    assert store.apply_default_rewards(older_than=cutoff, reward=-0.5, now=now) == 0

    events = store.training_events()
    assert [e.event_id for e in events] == ["d0", "d1", "d2", "d3", "d4"]
    assert {(e.source, e.reward) for e in events} == {("default", -0.5)}
    assert [e.reward_id for e in events] == sorted(e.reward_id for e in events)
    created = raw_sql(store_settings, "SELECT DISTINCT created_at FROM rewards")
    assert [utc_datetime(at) for (at,) in created] == [now]
    counts = store.counts()
    assert (counts.rewards, counts.default_rewards, counts.feedback) == (5, 5, 0)


def test_default_rewards_are_validated(store: DecisionStore) -> None:
    store.write_decisions([make_decision("e1")])
    later = T0 + timedelta(days=1)
    with pytest.raises(ValueError, match="limit"):
        store.apply_default_rewards(older_than=later, reward=0.0, now=later, limit=-1)
    with pytest.raises(ValueError, match="reward"):
        store.apply_default_rewards(older_than=later, reward=math.inf, now=later)
    with pytest.raises(ValueError, match="older_than must be timezone-aware"):
        store.apply_default_rewards(older_than=datetime(2024, 6, 1), reward=0.0, now=later)
    assert store.counts().rewards == 0


def test_default_rewards_skip_learned_feedback_but_cover_late_feedback(
    store: DecisionStore,
) -> None:
    store.write_decisions([make_decision(e) for e in ("answered", "late", "silent")])
    learned = store.record_feedback(
        received("answered", T0 + timedelta(seconds=30)), learn_within_s=60
    )
    late = store.record_feedback(received("late", T0 + timedelta(seconds=61)), learn_within_s=60)
    assert (learned.learned, late.learned) == (True, False)

    later = T0 + timedelta(hours=1)
    assert store.apply_default_rewards(older_than=later, reward=0.0, now=later) == 2
    events = store.training_events()
    assert [(e.event_id, e.source, e.reward) for e in events] == [
        ("answered", "feedback", 1.0),
        ("late", "default", 0.0),
        ("silent", "default", 0.0),
    ]
    # The late feedback stays what the user said, and stays unlearned.
    again = store.record_feedback(received("late", T0), learn_within_s=60)
    assert (again.created, again.learned, again.reward_id) == (False, False, None)
    counts = store.counts()
    assert (counts.feedback, counts.rewards, counts.default_rewards) == (2, 3, 2)


def test_feedback_after_a_default_reward_is_stored_but_not_learned(
    store: DecisionStore, store_settings: StoreSettings
) -> None:
    store.write_decisions([make_decision("e1")])
    later = T0 + timedelta(hours=1)
    assert store.apply_default_rewards(older_than=later, reward=-0.25, now=later) == 1

    # No wait given, so only the default reward already there keeps this from being learned.
    outcome = store.record_feedback(make_feedback("e1", reward=1.0))
    assert (outcome.created, outcome.learned, outcome.reward_id) == (True, False, None)
    assert outcome.record.reward == 1.0
    assert [bool(flag) for (flag,) in raw_sql(store_settings, "SELECT learned FROM feedback")] == [
        False
    ]
    assert [(e.source, e.reward) for e in store.training_events()] == [("default", -0.25)]
    retry = store.record_feedback(make_feedback("e1"))
    assert retry == replace(outcome, created=False)
    counts = store.counts()
    assert (counts.feedback, counts.rewards, counts.default_rewards) == (1, 1, 1)


def test_training_events_resume_after_a_watermark(store: DecisionStore) -> None:
    store.write_decisions(
        [
            make_decision(f"e{i}", created_at=T0 + timedelta(minutes=i), chosen=i % 3)
            for i in range(6)
        ]
    )
    later = T0 + timedelta(hours=1)
    store.record_feedback(make_feedback("e2", reward=1.0))
    assert store.apply_default_rewards(older_than=later, reward=0.0, now=later, limit=2) == 2
    store.record_feedback(make_feedback("e4", reward=0.25))
    assert store.apply_default_rewards(older_than=later, reward=0.0, now=later) == 2

    events = store.training_events()
    assert [(e.event_id, e.source, e.reward) for e in events] == [
        ("e2", "feedback", 1.0),
        ("e0", "default", 0.0),
        ("e1", "default", 0.0),
        ("e4", "feedback", 0.25),
        ("e3", "default", 0.0),
        ("e5", "default", 0.0),
    ]
    assert [e.features for e in events] == [FEATURES[i % 3] for i in (2, 0, 1, 4, 3, 5)]
    ids = [e.reward_id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 6

    # Page through the log the way a trainer would: the pages add up to the whole log.
    paged: list[int] = []
    watermark = 0
    while page := store.training_events(after_reward_id=watermark, limit=4):
        assert len(page) <= 4
        paged.extend(e.reward_id for e in page)
        watermark = page[-1].reward_id
    assert paged == ids

    assert store.training_events(after_reward_id=ids[2], limit=1) == [events[3]]
    assert store.training_events(after_reward_id=ids[2]) == events[3:]
    assert store.training_events(limit=0) == []
    assert store.training_events(after_reward_id=ids[-1]) == []
    with pytest.raises(ValueError, match="limit"):
        store.training_events(limit=-1)


def test_a_watermark_reader_sees_every_reward_once_despite_concurrent_writers(
    store: DecisionStore, store_settings: StoreSettings
) -> None:
    """Several processes' worth of writers, each with its own store (its own pool), and a
    trainer polling ``training_events(after_reward_id=W)``: if a lower reward id could
    commit after a higher one was read, the reader would skip it forever."""
    writers, per_writer, silent = 4, 50, 40
    store.write_decisions(
        [make_decision(f"w{w}-{i}") for w in range(writers) for i in range(per_writer)]
        + [make_decision(f"s{i}", created_at=T0 - timedelta(days=1)) for i in range(silent)]
    )
    cutoff, now = T0 - timedelta(hours=1), T0 + timedelta(hours=1)
    defaulters = 2
    barrier = threading.Barrier(writers + defaulters + 1, timeout=60)
    writing_done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []
    defaults_applied: list[int] = []

    def write(w: int) -> None:
        with make_store(store_settings) as mine:
            barrier.wait()
            for i in range(per_writer):
                outcome = mine.record_feedback(make_feedback(f"w{w}-{i}"))
                assert outcome.learned and outcome.reward_id is not None

    def apply_defaults() -> None:
        with make_store(store_settings) as mine:
            barrier.wait()
            # Small batches, racing each other and the feedback writers.
            while n := mine.apply_default_rewards(older_than=cutoff, reward=0.0, now=now, limit=3):
                defaults_applied.append(n)

    def read() -> None:
        watermark = 0
        barrier.wait()
        while True:
            final = writing_done.is_set()  # read before polling: the last poll sees it all
            batch = store.training_events(after_reward_id=watermark)
            ids = [e.reward_id for e in batch]
            assert ids == sorted(ids) and (not ids or ids[0] > watermark)
            seen.extend(ids)
            if ids:
                watermark = ids[-1]
            elif final:
                return

    def guarded(target: Any, *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                target(*args)
            except BaseException as err:  # surfaced below; a thread's exception is otherwise lost
                errors.append(err)
                barrier.abort()

        return threading.Thread(target=run)

    reader = guarded(read)
    workers = [guarded(write, w) for w in range(writers)]
    workers += [guarded(apply_defaults) for _ in range(defaulters)]
    for thread in [reader, *workers]:
        thread.start()
    for thread in workers:
        thread.join(timeout=120)
    writing_done.set()
    reader.join(timeout=60)
    assert errors == []
    assert not reader.is_alive() and not any(thread.is_alive() for thread in workers)

    all_ids = [row[0] for row in raw_sql(store_settings, "SELECT reward_id FROM rewards")]
    assert len(all_ids) == writers * per_writer + silent
    assert sum(defaults_applied) == silent
    assert len(seen) == len(set(seen)), "the reader saw a reward twice"
    assert set(seen) == set(all_ids), "the reader skipped a reward"
    counts = store.counts()
    assert (counts.rewards, counts.default_rewards) == (writers * per_writer + silent, silent)


# --- user history ------------------------------------------------------------------------------


def test_user_history_is_newest_first_and_per_user(store: DecisionStore) -> None:
    decisions = [
        make_decision("a-old", created_at=T0, chosen=0),
        make_decision("a-mid", created_at=T0 + timedelta(hours=1), chosen=1),
        make_decision("a-new", created_at=T0 + timedelta(hours=2), chosen=2),
        make_decision("a-unanswered", created_at=T0 + timedelta(hours=3)),
        make_decision("b-newest", user_key="user-b", created_at=T0 + timedelta(hours=4)),
    ]
    store.write_decisions(decisions)
    # Feedback arrives out of order: history is ordered by when the tip was shown.
    for event_id, reaction, reward in [
        ("a-mid", "snooze", 0.25),
        ("b-newest", "done", 1.0),
        ("a-new", "dismiss", 0.0),
        ("a-old", "done", 1.0),
    ]:
        store.record_feedback(make_feedback(event_id, reaction, reward))

    history = store.user_history("user-a", limit=2)
    assert [(h.kind, h.reaction, h.reward) for h in history] == [
        ("plan", "dismiss", 0.0),
        ("break", "snooze", 0.25),
    ]
    assert [h.shown_at for h in history] == [T0 + timedelta(hours=2), T0 + timedelta(hours=1)]
    assert [h.kind for h in store.user_history("user-a", limit=10)] == ["plan", "break", "focus"]
    assert [h.kind for h in store.user_history("user-b", limit=10)] == ["break"]
    assert store.user_history("user-a", limit=0) == []
    assert store.user_history("nobody", limit=10) == []
    with pytest.raises(ValueError, match="limit"):
        store.user_history("user-a", limit=-1)


# --- text and time -----------------------------------------------------------------------------


def test_unicode_round_trips(store: DecisionStore, store_settings: StoreSettings) -> None:
    text = 'Trink Wasser 💧 — 休憩しよう · اشرب الماء · e\u0301 ‘quotes’ "double" ; -- ?'
    user = "usér-ß-😀"
    store.write_decisions([make_decision("évent-🎯", user_key=user, content=text)])
    store.record_feedback(make_feedback("évent-🎯"))

    stored = store.get_decision("évent-🎯")
    assert stored is not None and stored.user_key == user
    assert [h.reaction for h in store.user_history(user, limit=5)] == ["done"]
    assert [c.content for c in store.decision_candidates("évent-🎯")] == [
        f"{text} #{i}" for i in range(3)
    ]
    assert [h.content for h in store.user_history(user, limit=5)] == [f"{text} #1"]


def test_datetimes_come_back_aware_utc_and_equal(store: DecisionStore) -> None:
    shown = datetime(2024, 12, 31, 23, 30, 0, 1, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    reacted = datetime(2024, 12, 31, 10, 15, tzinfo=timezone(timedelta(hours=-8)))
    store.write_decisions([make_decision("e1", created_at=shown)])
    outcome = store.record_feedback(
        FeedbackRecord("e1", "done", 0.9, 0.9, reacted_at=reacted, received_at=reacted)
    )

    stored = store.get_decision("e1")
    assert stored is not None
    values = [
        (stored.created_at, shown),
        (store.user_history("user-a", 1)[0].shown_at, shown),
        (outcome.record.reacted_at, reacted),
        (outcome.record.received_at, reacted),
    ]
    for got, sent in values:
        assert got == sent
        assert got.utcoffset() == timedelta(0)
        assert got.tzinfo is not None and got.tzname() == "UTC"
    assert outcome.record.value == 0.9


# --- lifecycle and configuration ---------------------------------------------------------------


def test_a_closed_store_refuses_work(store_settings: StoreSettings) -> None:
    store = make_store(store_settings)
    with pytest.raises(StoreError, match="not open"):
        store.get_decision("e1")
    with store:
        store.write_decisions([make_decision("e1")])
    store.close()  # closing twice is fine
    with pytest.raises(StoreError, match="not open"):
        store.counts()
    with open_store(store_settings) as reopened:
        assert reopened.counts().decisions == 1


def test_make_store_dispatches_on_the_url_scheme(tmp_path: Path) -> None:
    sqlite_store = make_store(StoreSettings(url=f"sqlite:///{tmp_path}/a.db"))
    assert isinstance(sqlite_store, SQLiteStore)
    assert sqlite_store.path == f"{tmp_path}/a.db"
    for url in ("postgresql://u@h/db", "postgres://u@h/db"):
        pg_store = make_store(StoreSettings(url=url, pg_schema="s", pool_max_size=7))
        assert isinstance(pg_store, PostgresStore)
        assert (pg_store.schema, pg_store.min_size, pg_store.max_size) == ("s", 1, 7)
    assert not (tmp_path / "a.db").exists()  # make_store does not connect


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///var/tipgraph.db", "var/tipgraph.db"),
        ("sqlite:////tmp/x/tipgraph.db", "/tmp/x/tipgraph.db"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_urls(url: str, path: str) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/db", "file:x.db"])
def test_bad_sqlite_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="SQLite URL"):
        SQLiteStore(url)


def test_sqlite_in_memory_works() -> None:
    with SQLiteStore("sqlite:///:memory:") as store:
        store.write_decisions([make_decision("e1")])
        assert store.counts().decisions == 1


def test_an_unreachable_postgres_raises_store_unavailable() -> None:
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test", min_size=1, timeout=2.0)
    with pytest.raises(StoreUnavailable):
        store.open()
    with pytest.raises(StoreError, match="not open"):
        store.counts()


# --- several writers on one SQLite file --------------------------------------------------------


def write_batch(url: str, prefix: str, count: int, start_at: float = 0.0) -> None:
    """Open a store on ``url`` and log ``count`` decisions with feedback, one at a time.

    Also the body of the child processes in the multi-process test.
    """
    time.sleep(max(0.0, start_at - time.time()))
    with SQLiteStore(url) as store:
        for i in range(count):
            event_id = f"{prefix}-{i}"
            store.write_decisions([make_decision(event_id, user_key=prefix)])
            store.write_policy_scores(event_id, [make_shadow()], CANDIDATE_IDS)
            assert store.record_feedback(make_feedback(event_id)).created


def _assert_all_written(url: str, prefixes: list[str], count: int) -> None:
    with SQLiteStore(url) as store:
        counts = store.counts()
        total = len(prefixes) * count
        assert (counts.decisions, counts.candidates, counts.feedback) == (total, 3 * total, total)
        assert counts.by_role == {"served": total, "shadow": total}
        assert len({e.reward_id for e in store.training_events()}) == total
        for prefix in prefixes:
            assert len(store.user_history(prefix, limit=count + 1)) == count


def test_two_sqlite_stores_on_one_file_lose_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    stores = [SQLiteStore(url), SQLiteStore(url)]
    for store in stores:
        store.open()
    prefixes = [f"t{n}" for n in range(4)]
    count = 25
    barrier = threading.Barrier(len(prefixes))
    errors: list[BaseException] = []

    def work(store: DecisionStore, prefix: str) -> None:
        try:
            barrier.wait()
            for i in range(count):
                event_id = f"{prefix}-{i}"
                store.write_decisions([make_decision(event_id, user_key=prefix)])
                store.write_policy_scores(event_id, [make_shadow()], CANDIDATE_IDS)
                store.record_feedback(make_feedback(event_id))
        except BaseException as err:  # surfaced below; a thread's exception is otherwise lost
            errors.append(err)

    threads = [
        threading.Thread(target=work, args=(stores[n % 2], prefix))
        for n, prefix in enumerate(prefixes)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for store in stores:
        store.close()
    assert errors == []
    _assert_all_written(url, prefixes, count)


def test_sqlite_processes_can_create_and_share_one_file(tmp_path: Path) -> None:
    """Like Ray replicas: several processes open a file that does not exist yet, at once."""
    url = f"sqlite:///{tmp_path}/fresh/shared.db"
    prefixes = [f"p{n}" for n in range(3)]
    count = 15
    start_at = time.time() + 2.0
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from test_store import write_batch; "
        "write_batch(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))"
    )
    tests_dir = str(Path(__file__).parent)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, tests_dir, url, prefix, str(count), str(start_at)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for prefix in prefixes
    ]
    outputs = [child.communicate(timeout=120) for child in children]
    failures = [err for child, (_, err) in zip(children, outputs, strict=True) if child.returncode]
    assert failures == []
    _assert_all_written(url, prefixes, count)


# --- logged events for off-policy evaluation ---------------------------------------------------


def test_logged_event_pages_read_the_log_in_pages_from_one_snapshot(
    store: DecisionStore, store_settings: StoreSettings
) -> None:
    ids = [f"e{i:02d}" for i in range(11)]
    store.write_decisions(
        [make_decision(e, created_at=T0 + timedelta(minutes=i)) for i, e in enumerate(ids)]
    )
    for event_id in ids:
        store.record_feedback(make_feedback(event_id))
    pages = store.logged_event_pages(page_size=4)
    first = next(pages)
    # Learned by another process after the read began: not in this read.
    with open_store(store_settings) as other:
        other.write_decisions([make_decision("late", created_at=T0 + timedelta(hours=1))])
        other.record_feedback(make_feedback("late"))
    rest = list(pages)
    assert [len(page) for page in [first, *rest]] == [4, 4, 3]
    assert [e.event_id for page in [first, *rest] for e in page] == ids
    assert [e.event_id for e in store.logged_events()] == [*ids, "late"]


def test_logged_events_carry_every_candidate_in_time_order(store: DecisionStore) -> None:
    from dataclasses import replace

    later = make_decision("late", created_at=T0 + timedelta(hours=2), chosen=2)
    other_prompt = replace(
        make_decision("v2", created_at=T0 + timedelta(hours=1), chosen=0), prompt_version="p4"
    )
    store.write_decisions(
        [
            later,
            make_decision("early", chosen=1),
            other_prompt,
            make_decision("silent", created_at=T0 + timedelta(hours=3)),
        ]
    )
    store.write_policy_scores("early", [make_shadow()], ["c0", "c1", "c2"])  # not the logger
    for event_id, reward in (("late", 0.25), ("early", 1.0), ("v2", 0.0)):
        assert store.record_feedback(make_feedback(event_id, reward=reward)).learned

    events = store.logged_events()
    assert [e.event_id for e in events] == ["early", "v2", "late"]  # "silent" has no reward
    early = events[0]
    assert early.features.tolist() == [list(f) for f in FEATURES]
    assert not early.features.flags.writeable  # a view of the unpacked value
    assert early.probabilities == [0.1, 0.7, 0.2]  # the served policy's, not the shadow's
    assert (early.chosen, early.reward, early.reward_source) == (1, 1.0, "feedback")
    assert early.created_at == T0 and early.policy_name == "linucb"
    assert events[2].chosen == 2 and events[2].reward == 0.25

    assert [e.event_id for e in store.logged_events(LogFilter(prompt_version="p4"))] == ["v2"]
    assert [e.event_id for e in store.logged_events(LogFilter(policy_name="nope"))] == []
    window = store.logged_events(
        LogFilter(since=T0 + timedelta(minutes=30), until=T0 + timedelta(hours=2))
    )
    assert [e.event_id for e in window] == ["v2"]  # since inclusive, until exclusive
    assert [
        e.event_id
        for e in store.logged_events(
            LogFilter(prompt_version="p3", policy_name="linucb", since=T0 + timedelta(hours=2))
        )
    ] == ["late"]


def test_logged_events_include_default_rewards(store: DecisionStore) -> None:
    store.write_decisions([make_decision("quiet")])
    assert (
        store.apply_default_rewards(
            older_than=T0 + timedelta(hours=1), reward=0.1, now=T0 + timedelta(hours=1)
        )
        == 1
    )
    (event,) = store.logged_events()
    assert (event.event_id, event.reward, event.reward_source) == ("quiet", 0.1, "default")


def test_erasing_a_user_keeps_what_was_learned(store: DecisionStore) -> None:
    store.write_decisions(
        [
            make_decision("a1", user_key="alice", chosen=0),
            make_decision("b1", user_key="bob", chosen=1),
            make_decision("a2", user_key="alice", chosen=2),
        ]
    )
    for event_id in ("a1", "b1", "a2"):
        store.record_feedback(make_feedback(event_id))
    before = store.training_events()
    assert [e.event_id for e in before] == ["a1", "b1", "a2"]

    assert store.erase_user("alice") == (2, 2)
    assert store.get_decision("a1") is None and store.get_decision("a2") is None
    assert store.get_decision("b1") is not None
    assert store.user_history("alice", 10) == []
    counts = store.counts()
    assert (counts.decisions, counts.candidates, counts.feedback) == (1, 3, 1)
    assert counts.policy_runs == 1 and counts.rewards == 3
    # A replica rebuilding from the rewards log learns exactly what it learned before.
    after = store.training_events()
    assert [(e.reward_id, e.features, e.reward) for e in after] == [
        (e.reward_id, e.features, e.reward) for e in before
    ]
    assert [e.event_id for e in after] == ["", "b1", ""]
    assert store.erase_user("alice") == (0, 0)  # idempotent


def test_an_erasure_is_tombstoned_so_late_rows_land_nowhere(store: DecisionStore) -> None:
    shadow = PolicyScoresEntry("early-shadow", [make_shadow()], CANDIDATE_IDS)
    early_held = make_feedback("early-shadow")  # feedback held before its decision landed
    store.write_batch([make_decision("kept", user_key="bob")], [shadow], [early_held])
    store.write_decisions([make_decision("old", user_key="eve")])
    store.record_feedback(make_feedback("old"))
    assert store.erase_users(["eve", "eve-under-a-retired-key"]) == (1, 1)
    # Rows buffered elsewhere arrive after the erasure: decisions, scores, held feedback.
    late = [make_decision("early-shadow", user_key="eve"), make_decision("late", user_key="eve")]
    held = [make_feedback("late"), make_feedback("kept")]
    scores = [PolicyScoresEntry(e, [make_shadow()], CANDIDATE_IDS) for e in ("late", "old")]
    assert store.write_batch(late, scores, held) == 2  # both decisions dropped
    for event_id in ("old", "late", "early-shadow"):
        assert store.get_decision(event_id) is None and store.is_erased(event_id)
    assert not store.is_erased("kept")
    counts = store.counts()
    # Only bob's decision remains, with its served run; the shadow row that came before
    # its (dropped) decision is gone too.
    assert (counts.decisions, counts.policy_runs, counts.feedback) == (1, 1, 0)
    assert store.count_held_feedback() == 1  # bob's; eve's late one was refused
    with pytest.raises(EventErased):
        store.record_feedback(make_feedback("late"))
    # A decision made after the erasure is a new one: a user who stays is logged again.
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert store.write_batch([make_decision("new", user_key="eve", created_at=after)], []) == 0
    assert store.get_decision("new") is not None
    # Erasing again erases that one too, and is otherwise harmless.
    assert store.erase_users(["eve"]) == (1, 0)


def test_held_feedback_waits_in_the_store_until_its_decision_is_readable(
    store: DecisionStore,
) -> None:
    store.write_batch([], [], [make_feedback("a"), make_feedback("b", "dismiss", 0.0)])
    store.write_batch([], [], [make_feedback("a", "snooze", 0.25)])  # the first held wins
    assert store.count_held_feedback() == 2 and store.held_feedback_ready(10) == []
    store.write_decisions([make_decision("a")])
    ((ready, decision),) = store.held_feedback_ready(10)
    assert ready == make_feedback("a")
    assert decision == store.get_decision("a")  # read in the same query
    store.delete_held_feedback(["a"])
    # "b" never gets a decision: it expires once received before the cutoff.
    assert store.expire_held_feedback(T0) == 0
    assert store.expire_held_feedback(T0 + timedelta(hours=1)) == 1
    assert store.count_held_feedback() == 0


# -- a role that may only read (store.migrate: false, the tuning job) -------------------------
def test_without_migrate_an_empty_or_old_sqlite_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ro.db'}"
    with pytest.raises(StoreUnavailable, match="cannot open"):
        SQLiteStore(url, migrate=False).open()  # read-only: makes no file
    assert not (tmp_path / "ro.db").exists()
    sqlite3.connect(tmp_path / "ro.db").close()
    with pytest.raises(MigrationError, match="no tipgraph schema yet"):
        SQLiteStore(url, migrate=False).open()
    migrating = SQLiteStore(url)
    migrating.open()  # migrates (and leaves it current)
    migrating.close()
    current = SQLiteStore(url, migrate=False)
    current.open()
    assert current.logged_events() == []
    current.close()
    with closing(sqlite3.connect(sqlite_path(url))) as conn, conn:
        conn.execute(
            "DELETE FROM schema_migrations "
            "WHERE version = (SELECT MAX(version) FROM schema_migrations)"
        )
    with pytest.raises(MigrationError, match="this code needs"):
        SQLiteStore(url, migrate=False).open()


@pytest.mark.postgres
def test_a_read_only_postgres_role_opens_a_current_schema_without_migrating(
    postgres_url: str, pg_schema: str
) -> None:
    owner = PostgresStore(postgres_url, schema=pg_schema)
    owner.open()
    owner.close()
    role = f"ro_{pg_schema}"
    reader_url = make_conninfo(postgres_url, user=role)  # trust auth: no password
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        for grant in (
            "GRANT USAGE ON SCHEMA {} TO {}",
            "GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}",
        ):
            conn.execute(sql.SQL(grant).format(sql.Identifier(pg_schema), sql.Identifier(role)))
    try:
        # Migrating needs rights the role does not have, even on a current schema.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            PostgresStore(reader_url, schema=pg_schema).open()
        reader = PostgresStore(reader_url, schema=pg_schema, migrate=False)
        reader.open()
        assert reader.logged_events() == []
        reader.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "DELETE FROM {}.schema_migrations WHERE version = "
                    "(SELECT MAX(version) FROM {}.schema_migrations)"
                ).format(sql.Identifier(pg_schema), sql.Identifier(pg_schema))
            )
        with pytest.raises(MigrationError, match="this code needs"):
            PostgresStore(reader_url, schema=pg_schema, migrate=False).open()
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# -- retention ---------------------------------------------------------------------------------
def learned(store: DecisionStore) -> list[tuple[int, list[float], float]]:
    return [(e.reward_id, e.features, e.reward) for e in store.training_events()]


@pytest.mark.parametrize("batch_size", [2, 1000])
def test_retention_deletes_exactly_the_expired_decisions_and_keeps_what_was_learned(
    store: DecisionStore, batch_size: int
) -> None:
    expired = [f"old{i}" for i in range(5)]
    store.write_batch(
        [
            make_decision(e, created_at=T0 + timedelta(minutes=i), chosen=i % 3)
            for i, e in enumerate(expired)
        ]
        + [make_decision("kept", created_at=T0 + timedelta(days=2))],
        [PolicyScoresEntry(e, [make_shadow()], CANDIDATE_IDS) for e in ("old4", "kept")],
        [make_feedback("old3")],  # held: a reaction still waiting to be applied
    )
    for event_id in ("old0", "old1", "kept"):
        store.record_feedback(make_feedback(event_id))
    # A default reward for old2; old3 and old4 were never rewarded.
    assert (
        store.apply_default_rewards(
            older_than=T0 + timedelta(minutes=2, seconds=1), reward=0.0, now=T0, limit=1
        )
        == 1
    )
    before = learned(store)
    assert len(before) == 4

    went = apply_retention(
        store, days=30, now=T0 + timedelta(days=31), batch_size=batch_size
    )  # keeps from T0 + 1 day
    assert went == ExpiredRows(decisions=5, feedback=2, policy_runs=6)  # 5 served + 1 shadow
    for event_id in expired:
        assert store.get_decision(event_id) is None
    assert store.get_decision("kept") is not None
    counts = store.counts()
    assert (counts.decisions, counts.candidates, counts.feedback) == (1, 3, 1)
    assert counts.by_role == {"served": 1, "shadow": 1}
    assert counts.rewards == 4 and store.count_held_feedback() == 0
    # A replica rebuilding from the rewards log learns exactly what it learned before.
    assert learned(store) == before
    assert [e.event_id for e in store.training_events()] == ["", "", "kept", ""]
    # Nothing left to do: a second run (another replica's) deletes nothing.
    assert (
        apply_retention(store, days=30, now=T0 + timedelta(days=31), batch_size=2) == ExpiredRows()
    )


def test_retention_deletes_what_expired_without_a_decision(
    store: DecisionStore, store_settings: StoreSettings
) -> None:
    cutoff = T0 + timedelta(days=1)
    # Feedback and shadow runs for decisions that never arrived.
    store.record_feedback(make_feedback("ghost-old", at=T0))
    store.record_feedback(make_feedback("ghost-new", at=T0 + timedelta(days=2)))
    store.write_batch([], [PolicyScoresEntry("ghost-run", [make_shadow()], CANDIDATE_IDS)])
    store.write_decisions([make_decision("d", created_at=T0 + timedelta(days=2))])
    vectors = {"h1": ([0.5, 0.25], [0.125])}
    store.cache_embeddings("user-a", vectors, "m", T0)
    store.cache_embeddings("user-b", vectors, "m", T0 + timedelta(days=2))

    assert store.delete_expired_leftovers(cutoff) == ExpiredRows(feedback=1, embeddings=1)
    assert store.cached_embeddings("user-a", ["h1"], "m") == {}
    assert store.cached_embeddings("user-b", ["h1"], "m") == {"h1": [0.5, 0.25]}
    assert raw_sql(store_settings, "SELECT event_id FROM feedback") == [("ghost-new",)]
    # The orphan shadow run was written now: it goes once the cutoff passes now; the
    # decision's own run is never a leftover.
    later = datetime.now(UTC) + timedelta(hours=1)
    assert store.delete_expired_leftovers(later).policy_runs == 1
    assert store.counts().policy_runs == 1


def test_retention_is_validated(store: DecisionStore) -> None:
    with pytest.raises(ValueError, match="limit must be >= 1"):
        store.delete_expired(T0, limit=0)
    with pytest.raises(ValueError, match=r"retention\.days=1 ends before"):
        TipgraphSettings(retention={"days": 1}, learning={"reward_wait_s": 86_400})


def test_the_served_run_is_written_with_its_decision_only(store: DecisionStore) -> None:
    served = make_decision("e1").served
    with pytest.raises(ValueError, match="only shadow runs are logged apart"):
        store.write_policy_scores("e1", [served], CANDIDATE_IDS)
    no_probabilities = replace(make_decision("e2"), served=replace(served, probabilities=[]))
    with pytest.raises(ValueError, match="one probability per candidate"):
        store.write_decisions([no_probabilities])
    assert store.counts().policy_runs == 0


def test_the_outbox_holds_each_written_decisions_event_until_it_is_deleted(
    store: DecisionStore,
) -> None:
    store.write_decisions([make_decision("before-outbox")])
    assert store.pending_decision_events(10) == []  # off unless the writer turns it on
    store.decision_outbox = True
    store.write_batch([make_decision("d1"), make_decision("d2", user_key="eve")], [])
    store.write_decisions([make_decision("d1")])  # a replayed decision: one event still
    first, second = store.pending_decision_events(10)
    stored = store.get_decision("d1")
    assert stored is not None
    assert (first.event_id, second.event_id) == ("d1", "d2") and first.seq < second.seq
    assert (first.policy_name, first.policy_version, first.created_at) == (
        stored.policy_name,
        stored.policy_version,
        stored.created_at,
    )
    assert (first.candidate_id, first.probability) == (
        stored.chosen_candidate_id,
        stored.chosen_probability,
    )
    assert first.prompt_version == make_decision("d1").prompt_version
    # An erased user's late decision brings no event with it.
    store.erase_users(["eve"])
    store.write_decisions([make_decision("late", user_key="eve")])
    store.delete_decision_events([first.seq])
    assert [e.event_id for e in store.pending_decision_events(10)] == ["d2"]
    assert store.pending_decision_events(0) == []
