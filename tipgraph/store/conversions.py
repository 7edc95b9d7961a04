"""Data steps of migrations: what SQL alone cannot convert, run inside the migration's
transaction at its ``-- @data <name>`` line (:mod:`tipgraph.store.migrate`).

Each step reads and writes in chunks of :data:`CHUNK` decisions, so its memory does not
grow with the log, and writes values the current code reads: a log converted by a step
reads back exactly as it did before (``tests/test_migrate_compact.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from tipgraph.store import _rows, packing, partitions
from tipgraph.store._sql import Cursor, pyformat

logger = logging.getLogger(__name__)

Dialect = Literal["sqlite", "postgres"]
CHUNK = 500


def _statement(dialect: Dialect, qmark: str, n: int = 0) -> str:
    """``qmark`` with ``{in}`` expanded to ``n`` placeholders, in the dialect's style."""
    text = qmark.replace("{in}", ", ".join("?" * n))
    return pyformat(text) if dialect == "postgres" else text


def compact_log(cur: Cursor, dialect: Dialect) -> None:
    """Migration 0009: candidates and served scores into each decision's packed value,
    shadow scores into their run's probabilities, rewards' copied features packed."""
    after, decisions = "", 0
    while True:
        cur.execute(
            _statement(
                dialect,
                "SELECT event_id, policy_name, chosen_candidate_id FROM decisions "
                "WHERE event_id > ? ORDER BY event_id LIMIT ?",
            ),
            (after, CHUNK),
        )
        chunk = cur.fetchall()
        if not chunk:
            break
        _convert_decisions(cur, dialect, chunk)
        decisions += len(chunk)
        after = chunk[-1][0]
    # Shadow runs whose decision had not arrived (events in flight during the upgrade):
    # tip_scores kept no candidate order, so they are left without probabilities and read
    # back as a run that logged none, never as a distribution in the wrong order.
    cur.execute(
        _statement(
            dialect,
            "SELECT COUNT(*) FROM policy_runs AS p WHERE p.role = 'shadow' "
            "AND NOT EXISTS (SELECT 1 FROM decisions AS d WHERE d.event_id = p.event_id)",
        )
    )
    orphans = int(cur.fetchone()[0])
    kept, after_reward = 0, 0
    while True:
        cur.execute(
            _statement(
                dialect,
                "SELECT reward_id, features FROM rewards "
                "WHERE features IS NOT NULL AND reward_id > ? ORDER BY reward_id LIMIT ?",
            ),
            (after_reward, CHUNK),
        )
        rewards = cur.fetchall()
        if not rewards:
            break
        cur.executemany(
            _statement(dialect, "UPDATE rewards SET packed_features = ? WHERE reward_id = ?"),
            [
                (packing.pack_vector(_rows.float_list(raw), what=f"reward {rid}"), rid)
                for rid, raw in rewards
            ],
        )
        kept += len(rewards)
        after_reward = rewards[-1][0]
    logger.info(
        "compacted %d decisions, %d shadow runs without a decision, %d rewards' features",
        decisions,
        orphans,
        kept,
    )


def _convert_decisions(cur: Cursor, dialect: Dialect, chunk: Sequence[Any]) -> None:
    ids = [row[0] for row in chunk]
    cur.execute(
        _statement(
            dialect,
            "SELECT event_id, candidate_id, kind, source, content, task_ref, model, "
            "prompt_version, features FROM candidates WHERE event_id IN ({in}) "
            "ORDER BY event_id, position",
            len(ids),
        ),
        ids,
    )
    candidates: dict[str, list[Any]] = {}
    for row in cur.fetchall():
        candidates.setdefault(row[0], []).append(row)
    cur.execute(
        _statement(
            dialect,
            "SELECT event_id, policy_name, candidate_id, probability FROM tip_scores "
            "WHERE event_id IN ({in})",
            len(ids),
        ),
        ids,
    )
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for event_id, policy_name, candidate_id, probability in cur.fetchall():
        runs = scores.setdefault(event_id, {})
        runs.setdefault(policy_name, {})[candidate_id] = float(probability)
    decision_rows: list[tuple[int, bytes, str | None, str]] = []
    run_rows: list[tuple[str, str, list[float]]] = []
    for event_id, served_name, chosen_id in chunk:
        rows = candidates.get(event_id, [])
        candidate_ids = [row[1] for row in rows]
        runs = scores.get(event_id, {})
        served = runs.pop(served_name, {})
        texts = [packing.CandidateTexts(*row[1:8]) for row in rows]
        chosen = next((t.content for t in texts if t.candidate_id == chosen_id), None)
        packed = packing.pack_candidates(
            # The shown tip's text goes to the decision row's chosen_content.
            [replace(t, content=None) if t.candidate_id == chosen_id else t for t in texts],
            [_rows.float_list(row[8]) for row in rows],
            # Every decision was written with its served scores, atomically.
            [served.get(c, 0.0) for c in candidate_ids],
        )
        decision_rows.append((len(rows), packed, chosen or None, event_id))
        # A shadow's scores on other candidates read back as no probabilities, as before.
        run_rows.extend(
            (event_id, policy_name, [probabilities[c] for c in candidate_ids])
            for policy_name, probabilities in runs.items()
            if set(probabilities) == set(candidate_ids)
        )
    cur.executemany(
        _statement(
            dialect,
            "UPDATE decisions SET n_candidates = ?, candidates = ?, chosen_content = ? "
            "WHERE event_id = ?",
        ),
        decision_rows,
    )
    _set_runs(cur, dialect, run_rows)


def _set_runs(cur: Cursor, dialect: Dialect, runs: Sequence[tuple[str, str, list[float]]]) -> None:
    cur.executemany(
        _statement(
            dialect,
            "UPDATE policy_runs SET probabilities = ? WHERE event_id = ? AND policy_name = ?",
        ),
        [
            (packing.pack_floats(p, what=f"{event_id}/{name}"), event_id, name)
            for event_id, name, p in runs
        ],
    )


def partition_decisions(cur: Cursor, dialect: Dialect) -> None:
    """Migration 0010 (Postgres): a partition for every week from the oldest decision's to
    :data:`~tipgraph.store.partitions.WEEKS_AHEAD` weeks past now, then every decision
    copied into them."""
    if dialect != "postgres":
        raise ValueError("only Postgres partitions its decisions")
    cur.execute("SELECT MIN(created_at), MAX(created_at) FROM decisions_unpartitioned")
    first, last = cur.fetchone()
    now = datetime.now(UTC)
    partitions.ensure_weeks(
        cur,
        min(first or now, now),
        max(last or now, now) + timedelta(weeks=partitions.WEEKS_AHEAD),
    )
    cur.execute("INSERT INTO decisions SELECT * FROM decisions_unpartitioned")
    logger.info("copied %d decisions into their week partitions", cur.rowcount)


DATA_STEPS: dict[str, Callable[[Cursor, Dialect], None]] = {
    "compact_log": compact_log,
    "partition_decisions": partition_decisions,
}
