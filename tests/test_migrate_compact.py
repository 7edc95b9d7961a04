"""Migration 0009 converts a schema-8 decision log to the compact layout, losing nothing.

``data/schema8_log.json.gz`` holds the rows a schema-8 tipgraph wrote (mixed-mode
candidates, two shadows and a failed one, an erased user whose reward kept its features)
and what that code read back from them (``data/make_schema8_log.py``).  Loaded into a
schema-8 database of each backend and migrated, the store must read back exactly the same
records, and the report must value every policy the same.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import tipgraph.store.migrate as migrate_module
from tests.data.make_schema8_log import plain
from tests.test_store import raw_sql
from tipgraph.settings import StoreSettings
from tipgraph.store import conversions, open_store
from tipgraph.store.sqlite import sqlite_path
from tuning.report import load_report

FIXTURE = Path(__file__).with_name("data") / "schema8_log.json.gz"


@pytest.fixture(scope="module")
def fixture() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(gzip.decompress(FIXTURE.read_bytes()))
    return loaded


def _load_schema8(settings: StoreSettings, tables: dict[str, Any]) -> None:
    """The fixture's rows, as written, into a database at schema 8."""
    if settings.url.startswith("sqlite"):
        with closing(sqlite3.connect(sqlite_path(settings.url))) as conn:
            for table, data in tables.items():
                marks = ", ".join("?" * len(data["columns"]))
                names = ", ".join(data["columns"])
                conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", data["rows"])
            conn.commit()
        return
    with psycopg.connect(settings.url) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(settings.pg_schema)))
        for table, data in tables.items():
            columns = data["columns"]
            rows = [
                [bool(v) if c == "learned" else v for c, v in zip(columns, row, strict=True)]
                for row in data["rows"]
            ]
            # Ids as written: feedback_id and reward_id are identity columns.
            statement = sql.SQL("INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({})").format(
                sql.Identifier(table),
                sql.SQL(", ").join(map(sql.Identifier, columns)),
                sql.SQL(", ").join(sql.Placeholder() * len(columns)),
            )
            with conn.cursor() as cur:
                cur.executemany(statement, rows)


REPORT_RTOL = 1e-12
"""The report's estimates are sums of products: numpy's BLAS picks its kernels by CPU, so
their last bits move between machines (the fixture was made on another one)."""


def assert_same_values(actual: Any, expected: Any, path: str = "report") -> None:
    """``actual == expected``, except that floats may differ by REPORT_RTOL."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_same_values(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_values(a, e, f"{path}[{i}]")
    elif isinstance(expected, float) and isinstance(actual, float):
        assert math.isclose(actual, expected, rel_tol=REPORT_RTOL, abs_tol=REPORT_RTOL) or (
            math.isnan(actual) and math.isnan(expected)
        ), f"{path}: {actual!r} != {expected!r}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def _with_orphan(tables: dict[str, Any]) -> dict[str, Any]:
    """The fixture plus a shadow run (with scores) whose decision never arrived."""
    tables = copy.deepcopy(tables)
    run = dict.fromkeys(tables["policy_runs"]["columns"])
    run.update(
        event_id="orphan", policy_name="egreedy", policy_version="egreedy-0.0", role="shadow",
        chosen_candidate_id="c1", chosen_probability=0.9, latency_ms=1.0,
        created_at="2026-12-06T05:00:00.000000+00:00",
    )  # fmt: skip
    tables["policy_runs"]["rows"].append([run[c] for c in tables["policy_runs"]["columns"]])
    for candidate, probability in (("c0", 0.1), ("c1", 0.9)):
        tables["tip_scores"]["rows"].append(["orphan", "egreedy", candidate, 0.0, probability])
    return tables


# 7: the decisions, rewards and scores span several chunks of the data step.
@pytest.mark.parametrize("chunk", [conversions.CHUNK, 7])
def test_a_schema8_log_reads_back_the_same_after_compaction(
    store_settings: StoreSettings,
    fixture: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    chunk: int,
) -> None:
    shipped = migrate_module.load_migrations
    monkeypatch.setattr(migrate_module, "load_migrations", lambda dialect: shipped(dialect)[:8])
    with open_store(store_settings) as old:
        assert old.schema_version() == 8
    _load_schema8(store_settings, _with_orphan(fixture["tables"]))
    monkeypatch.undo()
    monkeypatch.setattr(conversions, "CHUNK", chunk)

    expected = fixture["expected"]
    with open_store(store_settings) as store:
        assert store.schema_version() == 12
        assert plain(store.logged_events()) == expected["logged_events"]
        assert plain(store.logged_policy_runs()) == expected["logged_policy_runs"]
        assert plain(store.training_events()) == expected["training_events"]
        for event_id, decision in expected["decisions"].items():
            assert plain(store.get_decision(event_id)) == decision
        for user_key, history in expected["history"].items():
            assert plain(store.user_history(user_key, 50)) == history
        report = load_report(store)
        assert_same_values(plain(report.policies), expected["report_policies"])
        assert_same_values(plain(report.served_reward), expected["report_served"])

        # Every candidate's texts survive too (the store never read them back before).
        tables = fixture["tables"]
        columns = tables["candidates"]["columns"]
        by_event: dict[str, list[dict[str, Any]]] = {}
        for row in sorted(tables["candidates"]["rows"], key=lambda r: (r[0], r[2])):
            by_event.setdefault(row[0], []).append(dict(zip(columns, row, strict=True)))
        for event_id, rows in by_event.items():
            stored = store.decision_candidates(event_id)
            assert [
                (c.candidate_id, c.kind, c.source, c.content, c.task_ref, c.model) for c in stored
            ] == [
                (r["candidate_id"], r["kind"], r["source"], r["content"], r["task_ref"], r["model"])
                for r in rows
            ]
            assert [c.features for c in stored] == [json.loads(r["features"]) for r in rows]
        # The orphan's scores kept no candidate order: it reads as a run without them.
        assert raw_sql(
            store_settings, "SELECT probabilities FROM policy_runs WHERE event_id = 'orphan'"
        ) == [(None,)]
        counts = store.counts()
        assert counts.decisions == len(tables["decisions"]["rows"])
        assert counts.candidates == len(tables["candidates"]["rows"])
        assert counts.by_role["shadow"] == 1 + sum(
            1 for r in tables["policy_runs"]["rows"] if r[3] == "shadow"
        )
