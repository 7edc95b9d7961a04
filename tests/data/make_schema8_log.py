"""Made ``schema8_log.json.gz``: a small decision log in the schema-8 layout (one row per
candidate and per score, JSON features) and what the schema-8 code read back from it.

It ran once, at commit 85b2cf5 (the last code that wrote this layout), and cannot run on
later code; it stays as the record of how the fixture was made.  ``test_migrate_compact``
migrates the rows to the compact layout on SQLite and Postgres and checks that the store
reads back exactly what the schema-8 code did, and the report values it the same.

    .venv/bin/python tests/data/make_schema8_log.py
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import sqlite3
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from tipgraph.settings import load_settings
from tipgraph.simulated_tips import SimulatedModels
from tipgraph.simulator import run_local
from tipgraph.store import open_store
from tipgraph.store.records import PolicyScoresRecord
from tuning.report import load_report

TABLES = (
    "decisions",
    "candidates",
    "policy_runs",
    "tip_scores",
    "feedback",
    "rewards",
    "erased_users",
    "erased_events",
    "held_feedback",
)


def plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.isoformat()
    if hasattr(value, "tolist"):  # a numpy array, since LoggedEvent.features became one
        return value.tolist()
    return value


def main() -> None:
    out = Path(__file__).with_name("schema8_log.json.gz")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/log.db"
        settings = load_settings()
        generation = settings.generation.model_copy(
            update={"source": "mixed", "serve_from": "pool"}
        )
        settings = settings.model_copy(
            update={
                "store": settings.store.model_copy(update={"url": url}),
                "generation": generation,
            }
        )
        llm = SimulatedModels()
        run_local(settings, users=12, decisions=40, seed=3, block=40, llm=llm, task_churn=0.0)
        store = open_store(settings.store)
        with store:
            events = store.logged_events()
            # A shadow that failed (no scores) on one event, one that never answered on
            # another: both shapes the report reads.
            store.write_policy_scores(
                events[0].event_id,
                [
                    PolicyScoresRecord(
                        "broken",
                        "broken-0.0",
                        "shadow",
                        [],
                        [],
                        None,
                        None,
                        1.5,
                        error="RuntimeError: boom",
                    )
                ],
                [],
            )
            history_users = sorted(
                {d.user_key for d in (store.get_decision(e.event_id) for e in events) if d}
            )
            # Erasing a user copies their rewards' features (rewards.features).
            store.erase_user(history_users[0])
            store.apply_default_rewards(
                older_than=datetime(9999, 1, 1, tzinfo=UTC),
                reward=0.0,
                now=datetime.now(UTC),
            )
            conn = sqlite3.connect(f"{tmp}/log.db")
            tables = {}
            for table in TABLES:
                cur = conn.execute(f"SELECT * FROM {table}")
                tables[table] = {
                    "columns": [c[0] for c in cur.description],
                    "rows": cur.fetchall(),
                }
            (version,) = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            events = store.logged_events()
            report = load_report(store)
            expected = {
                "schema_version": version,
                "logged_events": plain(events),
                "logged_policy_runs": plain(store.logged_policy_runs()),
                "training_events": plain(store.training_events()),
                "decisions": {
                    row[0]: plain(store.get_decision(row[0])) for row in tables["decisions"]["rows"]
                },
                "history": {u: plain(store.user_history(u, 50)) for u in history_users},
                "report_policies": plain(report.policies),
                "report_served": plain(report.served_reward),
            }
    out.write_bytes(gzip.compress(json.dumps({"tables": tables, "expected": expected}).encode()))
    print(f"wrote {out}: {len(tables['decisions']['rows'])} decisions, {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
