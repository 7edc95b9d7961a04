"""The SQL both backends run, written once.

SQLite (3.35+) and Postgres agree on everything the store needs (``ON CONFLICT DO
NOTHING``, ``RETURNING``, scalar subqueries), so the statements are shared and written
with DB-API ``qmark`` placeholders; the Postgres backend rewrites them to ``%s`` once, at
import.  What remains per backend is how to connect and how a transaction starts.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

from tipgraph.store import _rows
from tipgraph.store.base import DecisionStore
from tipgraph.store.records import (
    DecisionRecord,
    FeedbackOutcome,
    FeedbackRecord,
    PolicyScoresRecord,
    ReactionHistoryItem,
    StoreCounts,
    StoredDecision,
    TrainingEvent,
)


class Cursor(Protocol):
    """The part of a DB-API cursor the store uses; ``sqlite3`` and ``psycopg`` both fit."""

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def executemany(self, query: Any, params_seq: Iterable[Any], /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Statements:
    """Every statement the store runs, in one placeholder style."""

    schema_version: str
    insert_decision: str
    insert_candidate: str
    insert_policy_run: str
    insert_tip_score: str
    select_decision: str
    insert_feedback: str
    select_feedback: str
    select_training_events: str
    select_user_history: str
    select_counts: str

    def translated(self, rewrite: Callable[[str], str]) -> Statements:
        """The same statements for a driver with another placeholder style."""
        return Statements(
            **{f.name: rewrite(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


QMARK_STATEMENTS = Statements(
    schema_version="SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
    insert_decision="""
        INSERT INTO decisions (
            event_id, user_key, created_at, policy_name, policy_version, feature_version,
            prompt_version, generation_source, chosen_candidate_id, chosen_kind,
            chosen_probability, latency_context_ms, latency_generation_ms,
            latency_scoring_ms, latency_total_ms, context_features
        ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (event_id) DO NOTHING
    """,
    insert_candidate="""
        INSERT INTO candidates (
            event_id, candidate_id, position, kind, source, content, task_ref, model,
            prompt_version, features
        ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (event_id, candidate_id) DO NOTHING
    """,
    insert_policy_run="""
        INSERT INTO policy_runs (
            event_id, policy_name, policy_version, role, chosen_candidate_id,
            chosen_probability, latency_ms, error, created_at
        ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (event_id, policy_name) DO NOTHING
    """,
    insert_tip_score="""
        INSERT INTO tip_scores (event_id, policy_name, candidate_id, score, probability)
        VALUES (?, ?, ?, ?, ?)
        ON CONFLICT (event_id, policy_name, candidate_id) DO NOTHING
    """,
    select_decision="""
        SELECT d.event_id, d.user_key, d.created_at, d.policy_name, d.policy_version,
               d.chosen_candidate_id, d.chosen_kind, d.chosen_probability, c.features
        FROM decisions AS d
        JOIN candidates AS c
          ON c.event_id = d.event_id AND c.candidate_id = d.chosen_candidate_id
        WHERE d.event_id = ?
    """,
    insert_feedback="""
        INSERT INTO feedback (event_id, reaction, value, reward, reacted_at, received_at)
        VALUES (?, ?, ?, ?, ?, ?)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING feedback_id
    """,
    select_feedback="""
        SELECT event_id, reaction, value, reward, reacted_at, received_at
        FROM feedback
        WHERE event_id = ?
    """,
    select_training_events="""
        SELECT f.feedback_id, f.event_id, c.features, f.reward
        FROM feedback AS f
        JOIN decisions AS d ON d.event_id = f.event_id
        JOIN candidates AS c
          ON c.event_id = d.event_id AND c.candidate_id = d.chosen_candidate_id
        WHERE f.feedback_id > ?
        ORDER BY f.feedback_id
    """,
    select_user_history="""
        SELECT d.chosen_kind, f.reaction, f.reward, d.created_at
        FROM decisions AS d
        JOIN feedback AS f ON f.event_id = d.event_id
        WHERE d.user_key = ?
        ORDER BY d.created_at DESC, f.feedback_id DESC
        LIMIT ?
    """,
    # One statement, so the numbers come from one snapshot on both backends.
    select_counts="""
        SELECT (SELECT COUNT(*) FROM decisions),
               (SELECT COUNT(*) FROM candidates),
               (SELECT COUNT(*) FROM policy_runs),
               (SELECT COUNT(*) FROM tip_scores),
               (SELECT COUNT(*) FROM feedback),
               (SELECT COUNT(*) FROM policy_runs WHERE role = 'served'),
               (SELECT COUNT(*) FROM policy_runs WHERE role = 'shadow')
    """,
)


def _insert_many(cur: Cursor, statement: str, rows: Sequence[_rows.Params]) -> None:
    if rows:
        cur.executemany(statement, rows)


class SQLDecisionStore(DecisionStore):
    """Every query of :class:`DecisionStore`, over whatever cursor a subclass hands out.

    Subclasses implement ``open``/``close`` and :meth:`_transaction`, and turn their
    driver's transient errors into ``StoreUnavailable`` there.
    """

    def __init__(self, statements: Statements) -> None:
        self._sql = statements

    @abc.abstractmethod
    def _transaction(self, *, write: bool) -> AbstractContextManager[Cursor]:
        """A cursor whose statements commit together on success and roll back on error.

        ``write=True`` promises the block writes, so a backend that must take its write
        lock up front (SQLite) can do so before the first read.
        """

    def schema_version(self) -> int:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.schema_version)
            return int(cur.fetchone()[0])

    def write_decisions(self, decisions: Sequence[DecisionRecord]) -> None:
        rows = _rows.decision_rows(decisions)
        if not rows.decisions:
            return
        with self._transaction(write=True) as cur:
            _insert_many(cur, self._sql.insert_decision, rows.decisions)
            _insert_many(cur, self._sql.insert_candidate, rows.candidates)
            _insert_many(cur, self._sql.insert_policy_run, rows.policy_runs)
            _insert_many(cur, self._sql.insert_tip_score, rows.tip_scores)

    def write_policy_scores(
        self, event_id: str, runs: Sequence[PolicyScoresRecord], candidate_ids: Sequence[str]
    ) -> None:
        created_at = _rows.db_timestamp(datetime.now(UTC), what="now")
        run_rows: list[_rows.Params] = []
        score_rows: list[_rows.Params] = []
        for run in runs:
            run_row, scores = _rows.policy_run_rows(event_id, run, candidate_ids, created_at)
            run_rows.append(run_row)
            score_rows.extend(scores)
        if not run_rows:
            return
        with self._transaction(write=True) as cur:
            _insert_many(cur, self._sql.insert_policy_run, run_rows)
            _insert_many(cur, self._sql.insert_tip_score, score_rows)

    def get_decision(self, event_id: str) -> StoredDecision | None:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_decision, (event_id,))
            row = cur.fetchone()
        return None if row is None else _rows.stored_decision(row)

    def record_feedback(self, feedback: FeedbackRecord) -> FeedbackOutcome:
        params = _rows.feedback_params(feedback)
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.insert_feedback, params)
            created = cur.fetchone() is not None
            # Read back rather than echo the argument: on a retry the first answer wins.
            cur.execute(self._sql.select_feedback, (feedback.event_id,))
            row = cur.fetchone()
        return FeedbackOutcome(record=_rows.feedback_record(row), created=created)

    def training_events(self, after_feedback_id: int = 0) -> list[TrainingEvent]:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_training_events, (after_feedback_id,))
            rows = cur.fetchall()
        return [_rows.training_event(row) for row in rows]

    def user_history(self, user_key: str, limit: int) -> list[ReactionHistoryItem]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_user_history, (user_key, limit))
            rows = cur.fetchall()
        return [_rows.history_item(row) for row in rows]

    def counts(self) -> StoreCounts:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_counts)
            return _rows.store_counts(cur.fetchone())
