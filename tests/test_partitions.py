"""Postgres's decisions in week partitions (migration 0010): where rows land, what retention
drops, that a week made late takes its rows from the default partition, and that queries
bounded in time read only their weeks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

import tipgraph.store.migrate as migrate_module
from tests.conftest import postgres_store_settings
from tests.test_store import (
    CANDIDATE_IDS,
    T0,
    learned,
    make_decision,
    make_feedback,
    make_shadow,
    raw_sql,
)
from tipgraph.retention import apply_retention
from tipgraph.settings import StoreSettings
from tipgraph.store import DecisionStore, ExpiredRows, PolicyScoresEntry, open_store
from tipgraph.store.partitions import WEEKS_AHEAD, week_partition, week_start, weeks_between

pytestmark = pytest.mark.postgres

MONDAY = week_start(T0)


@pytest.fixture
def pg_settings(postgres_url: str, pg_schema: str) -> StoreSettings:
    return postgres_store_settings(postgres_url, pg_schema)


@pytest.fixture
def pg_store(pg_settings: StoreSettings) -> Iterator[DecisionStore]:
    store = open_store(pg_settings)
    yield store
    store.close()


def partition_of(settings: StoreSettings, event_id: str) -> str:
    ((name,),) = raw_sql(
        settings, f"SELECT tableoid::regclass::text FROM decisions WHERE event_id = '{event_id}'"
    )
    return str(name)


def weeks(settings: StoreSettings) -> list[str]:
    rows = raw_sql(
        settings,
        "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'decisions'::regclass ORDER BY c.relname",
    )
    return [row[0] for row in rows]


def test_weeks_start_on_monday_utc() -> None:
    sunday_night = datetime(2026, 12, 6, 23, 30, tzinfo=UTC)
    week = week_partition(sunday_night)
    assert (week.name, week.start, week.end) == (
        "decisions_p20261130",
        datetime(2026, 11, 30, tzinfo=UTC),
        datetime(2026, 12, 7, tzinfo=UTC),
    )
    assert week_partition(week.end).name == "decisions_p20261207"
    assert [w.name for w in weeks_between(week.start, week.end)] == [
        "decisions_p20261130",
        "decisions_p20261207",
    ]


def test_an_opened_store_has_this_weeks_partition_and_the_next_ones(
    pg_store: DecisionStore, pg_settings: StoreSettings
) -> None:
    now = datetime.now(UTC)
    expected = [w.name for w in weeks_between(now, now + timedelta(weeks=WEEKS_AHEAD))]
    assert weeks(pg_settings) == sorted([*expected, "decisions_default"])
    pg_store.write_decisions([make_decision("now", created_at=now), make_decision("old")])
    assert partition_of(pg_settings, "now") == week_partition(now).name
    assert partition_of(pg_settings, "old") == "decisions_default"  # T0 is in 2024
    # Idempotent, from any replica.
    assert pg_store.maintain_partitions(now) == []


def test_a_week_made_late_takes_its_rows_from_the_default_partition(
    pg_store: DecisionStore, pg_settings: StoreSettings
) -> None:
    pg_store.write_decisions(
        [make_decision("a", created_at=T0), make_decision("b", created_at=T0 + timedelta(days=9))]
    )
    before = [pg_store.get_decision(e) for e in ("a", "b")]
    made = pg_store.maintain_partitions(T0)
    assert made[:2] == [week_partition(T0).name, week_partition(T0 + timedelta(days=7)).name]
    assert partition_of(pg_settings, "a") == week_partition(T0).name
    assert partition_of(pg_settings, "b") == week_partition(T0 + timedelta(days=9)).name
    assert raw_sql(pg_settings, "SELECT COUNT(*) FROM decisions_default") == [(0,)]
    assert [pg_store.get_decision(e) for e in ("a", "b")] == before
    # Their primary key still refuses the same decision twice.
    pg_store.write_decisions([make_decision("a", created_at=T0)])
    assert pg_store.counts().decisions == 2


def test_retention_drops_whole_expired_weeks_and_keeps_what_was_learned(
    pg_store: DecisionStore, pg_settings: StoreSettings
) -> None:
    pg_store.maintain_partitions(MONDAY)  # weeks from T0's
    old = [f"old{i}" for i in range(4)]  # T0's week, all expired
    pg_store.write_batch(
        [
            make_decision(e, created_at=MONDAY + timedelta(hours=i), chosen=i % 3)
            for i, e in enumerate(old)
        ]
        + [
            # Expired, but in the week the cutoff falls in: deleted row by row.
            make_decision("edge", created_at=MONDAY + timedelta(days=8)),
            make_decision("kept", created_at=MONDAY + timedelta(days=10)),
        ],
        [PolicyScoresEntry(e, [make_shadow()], CANDIDATE_IDS) for e in ("old3", "kept")],
        [make_feedback("old2")],  # held
    )
    for event_id in ("old0", "old1", "kept"):
        pg_store.record_feedback(make_feedback(event_id, at=MONDAY))
    assert (
        pg_store.apply_default_rewards(
            older_than=MONDAY + timedelta(hours=2, seconds=1), reward=0.0, now=T0, limit=10
        )
        == 1  # old2
    )
    before = learned(pg_store)
    old_week = week_partition(MONDAY).name

    now = MONDAY + timedelta(days=39)  # cutoff: Monday + 9 days, inside the second week
    went = apply_retention(pg_store, days=30, now=now, batch_size=2)
    assert old_week not in weeks(pg_settings)
    # What the row-by-row path deletes: 5 served runs and old3's shadow run.
    assert went == ExpiredRows(decisions=5, feedback=2, policy_runs=6)
    for event_id in [*old, "edge"]:
        assert pg_store.get_decision(event_id) is None
    assert pg_store.get_decision("kept") is not None
    assert learned(pg_store) == before
    assert [e.event_id for e in pg_store.training_events()] == ["", "", "kept", ""]
    assert pg_store.count_held_feedback() == 0
    # The user's history holds no reaction to a dropped decision.
    assert [h.shown_at for h in pg_store.user_history("user-a", 50)] == [
        MONDAY + timedelta(days=10)
    ]
    assert pg_store.delete_expired_leftovers(datetime.now(UTC) + timedelta(hours=1)) == (
        ExpiredRows()
    )
    # Another replica's run finds nothing more.
    assert apply_retention(pg_store, days=30, now=now, batch_size=2) == ExpiredRows()


def test_a_reward_that_lands_between_the_chunks_and_the_drop_keeps_its_features(
    pg_store: DecisionStore, pg_settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg_store.maintain_partitions(MONDAY)
    pg_store.write_decisions([make_decision(f"e{i}", created_at=MONDAY) for i in range(3)])
    pg_store.record_feedback(make_feedback("e0", at=MONDAY))
    unlocked_pass = pg_store._clear_week  # type: ignore[attr-defined]

    def then_feedback_arrives(*args: object) -> ExpiredRows:
        cleared: ExpiredRows = unlocked_pass(*args)
        with open_store(pg_settings) as other:  # another replica, before the drop
            other.record_feedback(make_feedback("e1", at=MONDAY))
        return cleared

    monkeypatch.setattr(pg_store, "_clear_week", then_feedback_arrives)
    went = pg_store.drop_expired_partitions(MONDAY + timedelta(weeks=1))
    assert went == ExpiredRows(decisions=3, feedback=2, policy_runs=3)
    after = pg_store.training_events()
    assert [e.event_id for e in after] == ["", ""]
    assert [len(e.features) for e in after] == [4, 4]  # e1's reward kept its features too


def test_queries_bounded_in_time_read_only_their_weeks(
    pg_store: DecisionStore, pg_settings: StoreSettings
) -> None:
    pg_store.maintain_partitions(MONDAY)
    start, end = MONDAY + timedelta(days=7), MONDAY + timedelta(days=9)
    plan = raw_sql(
        pg_settings,
        "EXPLAIN (FORMAT JSON) SELECT event_id FROM decisions "
        f"WHERE created_at >= '{start.isoformat()}' AND created_at < '{end.isoformat()}'",
    )[0][0]
    text = json.dumps(plan)
    assert week_partition(start).name in text
    assert week_partition(MONDAY).name not in text and "decisions_default" not in text


def test_migration_0010_moves_a_schema_9_log_into_week_partitions(
    pg_settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = migrate_module.load_migrations
    monkeypatch.setattr(migrate_module, "load_migrations", lambda dialect: shipped(dialect)[:9])
    events = {"a": T0, "b": T0 + timedelta(days=20), "c": datetime.now(UTC)}
    with open_store(pg_settings) as old:
        assert old.schema_version() == 9
        old.write_decisions([make_decision(e, created_at=at) for e, at in events.items()])
        before = {e: old.get_decision(e) for e in events}
    # Schema 9's feedback and reward rows, as that release wrote them.
    reacted = (T0 + timedelta(minutes=1)).isoformat()
    raw_sql(
        pg_settings,
        "INSERT INTO feedback (event_id, reaction, value, reward, reacted_at, received_at) "
        f"VALUES ('a', 'done', NULL, 1.0, '{reacted}', '{reacted}')",
    )
    raw_sql(
        pg_settings,
        "INSERT INTO rewards (event_id, reward, source, created_at) "
        f"VALUES ('a', 1.0, 'feedback', '{reacted}')",
    )
    with open_store(pg_settings) as old:
        learned_before = learned(old)
    assert len(learned_before) == 1
    monkeypatch.undo()

    with open_store(pg_settings) as store:
        assert store.schema_version() == 12
        for event_id, at in events.items():
            assert partition_of(pg_settings, event_id) == week_partition(at).name
        assert {e: store.get_decision(e) for e in events} == before
        assert learned(store) == learned_before
        # Migration 0011 gave the reaction what the history shows of its decision.
        history = store.user_history("user-a", 50)
        assert [(h.reaction, h.shown_at, h.content) for h in history] == [
            ("done", T0, "Take a short walk #1")
        ]
        # Every week from the oldest decision's on has its partition, none is missing.
        assert set(weeks(pg_settings)) >= {
            w.name for w in weeks_between(T0, datetime.now(UTC) + timedelta(weeks=WEEKS_AHEAD))
        }
        # Erasure clears the reward's event id itself now that no foreign key does.
        store.erase_user("user-a")
        assert [e.event_id for e in store.training_events()] == [""]
