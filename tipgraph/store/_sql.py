"""The SQL both backends run, written once.

SQLite (3.35+) and Postgres agree on everything the store needs (``ON CONFLICT DO
NOTHING``, ``RETURNING``, scalar subqueries), so the statements are shared and written
with DB-API ``qmark`` placeholders; the Postgres backend rewrites them to ``%s`` once, at
import.  What remains per backend is how to connect, how a transaction starts, and how a
transaction that inserts rewards keeps reward ids in commit order
(:meth:`SQLDecisionStore._serialize_reward_writes`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

from tipgraph.store import _rows, packing
from tipgraph.store.base import DecisionStore, EventErased
from tipgraph.store.filters import EVERYTHING, LogFilter
from tipgraph.store.records import (
    CandidateRecord,
    DecisionEventRow,
    DecisionRecord,
    ExpiredRows,
    ExposureItem,
    FeedbackOutcome,
    FeedbackRecord,
    LoggedEvent,
    LoggedRuns,
    PolicyOutcomes,
    PolicyScoresEntry,
    PolicyScoresRecord,
    PoolEntry,
    PoolKey,
    PoolTip,
    ReactionHistoryItem,
    StoreCounts,
    StoredDecision,
    TrainingEvent,
)

# Bounds used when logged_events is asked for "everything".
LOG_START = datetime(1970, 1, 1, tzinfo=UTC)
LOG_END = datetime(9999, 12, 31, tzinfo=UTC)
LOG_PAGE = 5000
"""Learned decisions per page of :meth:`SQLDecisionStore.logged_event_pages`."""


class Cursor(Protocol):
    """The part of a DB-API cursor the store uses; ``sqlite3`` and ``psycopg`` both fit."""

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def executemany(self, query: Any, params_seq: Iterable[Any], /) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def fetchmany(self, size: int = ..., /) -> list[Any]: ...

    @property
    def rowcount(self) -> int: ...


def pyformat(statement: str) -> str:
    """Shared qmark SQL -> psycopg's ``%s``; a literal ``%`` would need escaping, so refuse it."""
    if "%" in statement:
        raise ValueError(f"shared SQL must not contain '%': {statement!r}")
    return statement.replace("?", "%s")


@dataclasses.dataclass(frozen=True, slots=True)
class Statements:
    """Every statement the store runs, in one placeholder style."""

    schema_version: str
    insert_decision: str
    insert_policy_run: str
    select_decision: str
    select_decision_for_feedback: str
    insert_feedback: str
    select_feedback: str
    insert_feedback_reward: str
    mark_feedback_unlearned: str
    insert_default_rewards: str
    select_training_events: str
    select_training_events_page: str
    select_user_history: str
    select_exposures: str
    select_outcomes: str
    select_counts: str
    select_logged: str
    select_logged_by_prompt: str
    select_logged_by_policy: str
    select_logged_by_prompt_and_policy: str
    select_runs: str
    select_runs_by_prompt: str
    select_runs_by_policy: str
    select_runs_by_prompt_and_policy: str
    select_chosen_of_user: str
    keep_reward_features: str
    delete_feedback_of_user: str
    delete_reactions_of_user: str
    delete_policy_runs_of_user: str
    detach_rewards_of_user: str
    delete_decisions_of_user: str
    insert_erased_user: str
    insert_erased_events_of_user: str
    insert_dropped_event: str
    delete_runs_of_dropped_event: str
    delete_held_of_dropped_event: str
    select_erased_event: str
    delete_held_of_user: str
    insert_held: str
    select_held_ready: str
    delete_held: str
    expire_held: str
    count_held: str
    read_pool_entry: str
    count_pool_serves: str
    claim_pool_refill: str
    fill_pool_entry: str
    delete_other_task_sets: str
    release_pool_claim: str
    delete_expired_pool: str
    delete_pool_beyond: str
    delete_pool_of_user: str
    select_embedding: str
    select_projection: str
    insert_embedding: str
    delete_embeddings_of_user: str
    select_expired_decisions: str
    select_chosen_of_event: str
    select_candidates: str
    delete_feedback_of_event: str
    delete_held_of_event: str
    delete_policy_runs_of_event: str
    detach_rewards_of_event: str
    delete_decision: str
    delete_expired_orphan_runs: str
    delete_expired_orphan_feedback: str
    delete_expired_embeddings: str
    insert_decision_event: str
    select_decision_events: str
    delete_decision_event: str

    def translated(self, rewrite: Callable[[str], str]) -> Statements:
        """The same statements for a driver with another placeholder style."""
        return Statements(
            **{f.name: rewrite(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )


# r.features is set once the decision was erased (see migration 0004); until then the
# decision's packed candidates hold them (the chosen one's row).
_TRAINING_EVENTS = """
        SELECT r.reward_id, r.event_id, r.features, r.reward, r.source, r.created_at,
               d.candidates, d.chosen_candidate_id
        FROM rewards AS r
        LEFT JOIN decisions AS d ON d.event_id = r.event_id
        WHERE r.reward_id > ? AND (r.features IS NOT NULL OR d.event_id IS NOT NULL)
        ORDER BY r.reward_id
"""


def _logged_events(*filters: str) -> str:
    """Every learned decision with its packed candidates (features, served probabilities),
    ordered by time, then event; also what its served run needs (logged_policy_runs)."""
    extra = "".join(f" AND {condition} = ?" for condition in filters)
    return f"""
        SELECT d.event_id, d.created_at, d.policy_name, d.prompt_version,
               d.chosen_candidate_id, r.reward, r.source, r.reward_id, d.feature_version,
               d.candidates, d.generation_source, d.policy_version
        FROM decisions AS d
        JOIN rewards AS r ON r.event_id = d.event_id
        WHERE d.created_at >= ? AND d.created_at < ?{extra}
        ORDER BY d.created_at, d.event_id
    """


def _logged_runs(*filters: str) -> str:
    """The shadow runs on the decisions :func:`_logged_events` selects (the served run is
    part of the decision)."""
    extra = "".join(f" AND {condition} = ?" for condition in filters)
    return f"""
        SELECT p.event_id, p.policy_name, p.policy_version, p.role, p.chosen_candidate_id,
               p.error, p.probabilities
        FROM decisions AS d
        JOIN rewards AS r ON r.event_id = d.event_id
        JOIN policy_runs AS p ON p.event_id = d.event_id
        WHERE d.created_at >= ? AND d.created_at < ?{extra}
    """


QMARK_STATEMENTS = Statements(
    # The outbox row goes with its decision, and is dropped with it (an erased user).
    insert_decision_event="""
        INSERT INTO decision_outbox (
            event_id, created_at, policy_name, policy_version, prompt_version, candidate_id,
            probability
        ) SELECT ?, ?, ?, ?, ?, ?, ?
        WHERE NOT EXISTS (
            SELECT 1 FROM erased_users WHERE user_key = ? AND erased_at >= ?
        )
        ON CONFLICT (event_id) DO NOTHING
    """,
    select_decision_events="""
        SELECT seq, event_id, created_at, policy_name, policy_version, prompt_version,
               candidate_id, probability
        FROM decision_outbox ORDER BY seq LIMIT ?
    """,
    delete_decision_event="DELETE FROM decision_outbox WHERE seq = ?",
    schema_version="SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
    # Every row checks the tombstones in its own statement, inside the write transaction
    # (which holds the erasure lock shared: see _guard_erasure), so nothing lands for a user
    # or event erased before it commits.  A user's tombstone covers decisions made up to
    # the erasure: a user who goes on using the app after it is logged again.  Params: the
    # row, then what the check reads.  The conflict has no target: Postgres keys its
    # partitioned decisions by (event_id, created_at) (migration 0010), SQLite by event_id.
    insert_decision="""
        INSERT INTO decisions (
            event_id, user_key, created_at, policy_name, policy_version, feature_version,
            prompt_version, generation_source, chosen_candidate_id, chosen_kind,
            chosen_probability, latency_context_ms, latency_generation_ms,
            latency_scoring_ms, latency_total_ms, generation_reason, llm_model, user_key_id,
            llm_pool, llm_pool_age_s, eligibility, n_candidates, candidates, chosen_content
        ) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
        WHERE NOT EXISTS (
            SELECT 1 FROM erased_users WHERE user_key = ? AND erased_at >= ?
        )
        ON CONFLICT DO NOTHING
    """,
    insert_policy_run="""
        INSERT INTO policy_runs (
            event_id, policy_name, policy_version, role, chosen_candidate_id,
            chosen_probability, latency_ms, error, created_at, probabilities
        ) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?
        WHERE NOT EXISTS (SELECT 1 FROM erased_events WHERE event_id = ?)
        ON CONFLICT (event_id, policy_name) DO NOTHING
    """,
    select_decision="""
        SELECT event_id, user_key, created_at, policy_name, policy_version,
               chosen_candidate_id, chosen_kind, chosen_probability, candidates
        FROM decisions WHERE event_id = ?
    """,
    # What a reaction keeps of its decision: when it was made, and what the user's history
    # shows of it (migration 0011).
    select_decision_for_feedback="""
        SELECT user_key, created_at, chosen_kind, chosen_content
        FROM decisions WHERE event_id = ?
    """,
    insert_feedback="""
        INSERT INTO feedback (
            event_id, reaction, value, reward, reacted_at, received_at, learned,
            user_key, decided_at, chosen_kind, chosen_content
        ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING feedback_id
    """,
    # The reward a feedback produced, if any: a 'default' reward for the same event is
    # not this feedback's.
    select_feedback="""
        SELECT f.event_id, f.reaction, f.value, f.reward, f.reacted_at, f.received_at,
               f.learned, r.reward_id
        FROM feedback AS f
        LEFT JOIN rewards AS r ON r.event_id = f.event_id AND r.source = 'feedback'
        WHERE f.event_id = ?
    """,
    insert_feedback_reward="""
        INSERT INTO rewards (event_id, reward, source, created_at)
        VALUES (?, ?, 'feedback', ?)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING reward_id
    """,
    mark_feedback_unlearned="UPDATE feedback SET learned = FALSE WHERE event_id = ?",
    # ON CONFLICT keeps concurrent runs (and a feedback reward committed in between) from
    # ever giving an event a second reward; the NOT EXISTS only keeps LIMIT from being
    # spent on decisions that already have one.  SQLite needs the WHERE clause to parse
    # the upsert after a SELECT.
    insert_default_rewards="""
        INSERT INTO rewards (event_id, reward, source, created_at)
        SELECT d.event_id, ?, 'default', ?
        FROM decisions AS d
        WHERE d.created_at < ?
          AND NOT EXISTS (SELECT 1 FROM rewards AS r WHERE r.event_id = d.event_id)
        ORDER BY d.created_at, d.event_id
        LIMIT ?
        ON CONFLICT (event_id) DO NOTHING
        RETURNING reward_id
    """,
    select_training_events=_TRAINING_EVENTS,
    # Separate statement: "no limit" is LIMIT -1 in SQLite but an error in Postgres.
    select_training_events_page=_TRAINING_EVENTS + " LIMIT ?",
    # Per policy, over the decisions made since: what the guardrails judge.
    select_outcomes="""
        SELECT d.policy_name, COUNT(r.reward), COALESCE(SUM(r.reward), 0),
               COALESCE(SUM(r.reward * r.reward), 0), COUNT(f.reaction),
               SUM(CASE WHEN f.reaction = 'dismiss' THEN 1 ELSE 0 END)
        FROM decisions AS d
        LEFT JOIN rewards AS r ON r.event_id = d.event_id
        LEFT JOIN feedback AS f ON f.event_id = d.event_id
        WHERE d.created_at >= ?
        GROUP BY d.policy_name
    """,
    # The decisions_user_created_idx index serves it.
    select_exposures="""
        SELECT chosen_candidate_id, chosen_kind, created_at FROM decisions
        WHERE user_key = ? AND created_at >= ?
        ORDER BY created_at DESC
        LIMIT ?
    """,
    # The feedback_user_decided_idx index serves it: feedback alone, no decision read.
    select_user_history="""
        SELECT chosen_kind, reaction, reward, decided_at, chosen_content
        FROM feedback
        WHERE user_key = ?
        ORDER BY decided_at DESC, feedback_id DESC
        LIMIT ?
    """,
    select_logged=_logged_events(),
    select_logged_by_prompt=_logged_events("d.prompt_version"),
    select_logged_by_policy=_logged_events("d.policy_name"),
    select_logged_by_prompt_and_policy=_logged_events("d.prompt_version", "d.policy_name"),
    select_runs=_logged_runs(),
    select_runs_by_prompt=_logged_runs("d.prompt_version"),
    select_runs_by_policy=_logged_runs("d.policy_name"),
    select_runs_by_prompt_and_policy=_logged_runs("d.prompt_version", "d.policy_name"),
    # Erasure and retention keep what the rewards trained on (see migration 0004): the
    # chosen candidates' features are unpacked here and written back into each reward.
    select_chosen_of_user="""
        SELECT r.event_id, d.candidates, d.chosen_candidate_id
        FROM rewards AS r JOIN decisions AS d ON d.event_id = r.event_id
        WHERE d.user_key = ? AND r.features IS NULL
    """,
    keep_reward_features="UPDATE rewards SET features = ? WHERE event_id = ? AND features IS NULL",
    delete_feedback_of_user="""
        DELETE FROM feedback
        WHERE event_id IN (SELECT event_id FROM decisions WHERE user_key = ?)
    """,
    # Its own statement, not an OR above, which would cost every erasure a full scan.
    # Feedback that landed before its decision has no user_key; this finds the user's
    # reactions whose decision is gone (a retention chunk raced them).
    delete_reactions_of_user="DELETE FROM feedback WHERE user_key = ?",
    # Shadow runs may land before their decision, so policy_runs has no foreign key to it.
    delete_policy_runs_of_user="""
        DELETE FROM policy_runs
        WHERE event_id IN (SELECT event_id FROM decisions WHERE user_key = ?)
    """,
    # Rewards keep their features; their event is gone.  Postgres's partitioned decisions
    # take no foreign key (migration 0010), so this is not left to ON DELETE SET NULL.
    detach_rewards_of_user="""
        UPDATE rewards SET event_id = NULL
        WHERE event_id IN (SELECT event_id FROM decisions WHERE user_key = ?)
    """,
    delete_decisions_of_user="DELETE FROM decisions WHERE user_key = ?",
    insert_erased_user="""
        INSERT INTO erased_users (user_key, erased_at) VALUES (?, ?)
        ON CONFLICT (user_key) DO UPDATE SET erased_at = CASE
            WHEN excluded.erased_at > erased_users.erased_at THEN excluded.erased_at
            ELSE erased_users.erased_at
        END
    """,
    insert_erased_events_of_user="""
        INSERT INTO erased_events (event_id, erased_at)
        SELECT event_id, ? FROM decisions WHERE user_key = ?
        ON CONFLICT (event_id) DO NOTHING
    """,
    # A decision of an erased user arriving late: remember its event, so its shadow rows
    # and feedback are refused too.  Params: event_id, now, user_key, created_at.
    insert_dropped_event="""
        INSERT INTO erased_events (event_id, erased_at)
        SELECT ?, ? WHERE EXISTS (
            SELECT 1 FROM erased_users WHERE user_key = ? AND erased_at >= ?
        )
        ON CONFLICT (event_id) DO NOTHING
    """,
    # Shadow rows and held feedback may have landed before their (dropped) decision.
    delete_runs_of_dropped_event="""
        DELETE FROM policy_runs
        WHERE event_id = ? AND EXISTS (SELECT 1 FROM erased_events WHERE event_id = ?)
    """,
    delete_held_of_dropped_event="""
        DELETE FROM held_feedback
        WHERE event_id = ? AND EXISTS (SELECT 1 FROM erased_events WHERE event_id = ?)
    """,
    select_erased_event="SELECT 1 FROM erased_events WHERE event_id = ?",
    delete_held_of_user="""
        DELETE FROM held_feedback
        WHERE event_id IN (SELECT event_id FROM decisions WHERE user_key = ?)
    """,
    insert_held="""
        INSERT INTO held_feedback (event_id, reaction, value, reward, reacted_at, received_at)
        SELECT ?, ?, ?, ?, ?, ?
        WHERE NOT EXISTS (SELECT 1 FROM erased_events WHERE event_id = ?)
        ON CONFLICT (event_id) DO NOTHING
    """,
    # Held feedback whose decision is readable now, with the decision (the columns of
    # select_decision): one query for a whole batch.
    select_held_ready="""
        SELECT h.event_id, h.reaction, h.value, h.reward, h.reacted_at, h.received_at,
               d.event_id, d.user_key, d.created_at, d.policy_name, d.policy_version,
               d.chosen_candidate_id, d.chosen_kind, d.chosen_probability, d.candidates
        FROM held_feedback AS h
        JOIN decisions AS d ON d.event_id = h.event_id
        ORDER BY h.received_at
        LIMIT ?
    """,
    delete_held="DELETE FROM held_feedback WHERE event_id = ?",
    expire_held="""
        DELETE FROM held_feedback
        WHERE received_at < ?
          AND NOT EXISTS (SELECT 1 FROM decisions AS d WHERE d.event_id = held_feedback.event_id)
    """,
    count_held="SELECT COUNT(*) FROM held_feedback",
    # The candidate pool (migration 0006).  The request path only reads; serves are
    # counted in batches, for the entry as generated then (an increment that arrives after
    # a refill belongs to the old tips and is dropped).
    # Params: user_key, fingerprint, prompt_version, now.
    read_pool_entry="""
        SELECT tips, model, judge_version, generated_at, serves FROM tip_pool
        WHERE user_key = ? AND fingerprint = ? AND prompt_version = ?
          AND tips IS NOT NULL AND expires_at > ?
    """,
    # Params: count, user_key, fingerprint, prompt_version, generated_at.
    count_pool_serves="""
        UPDATE tip_pool SET serves = serves + ?
        WHERE user_key = ? AND fingerprint = ? AND prompt_version = ? AND generated_at = ?
    """,
    # A refill is claimed by one replica at a time; a claim older than the stale cutoff
    # (its replica died) is taken over.  Params: key (3), now, stale_before.
    claim_pool_refill="""
        INSERT INTO tip_pool (user_key, fingerprint, prompt_version, claimed_at)
        VALUES (?, ?, ?, ?)
        ON CONFLICT (user_key, fingerprint, prompt_version) DO UPDATE
        SET claimed_at = excluded.claimed_at
        WHERE tip_pool.claimed_at IS NULL OR tip_pool.claimed_at < ?
        RETURNING claimed_at
    """,
    # Only the claim's holder fills: an entry erased (or taken over) meanwhile stays gone.
    # Params: tips, model, judge_version, generated_at, expires_at, key (3), claimed_at.
    fill_pool_entry="""
        UPDATE tip_pool
        SET tips = ?, model = ?, judge_version = ?, generated_at = ?, expires_at = ?,
            serves = 0, claimed_at = NULL
        WHERE user_key = ? AND fingerprint = ? AND prompt_version = ? AND claimed_at = ?
    """,
    # A new task set makes the user's entries for the old ones useless.
    delete_other_task_sets="DELETE FROM tip_pool WHERE user_key = ? AND fingerprint <> ?",
    release_pool_claim="""
        UPDATE tip_pool SET claimed_at = NULL
        WHERE user_key = ? AND fingerprint = ? AND prompt_version = ? AND claimed_at = ?
    """,
    # Expired entries, and claims that never filled and are long stale.  Params: now, stale.
    delete_expired_pool="""
        DELETE FROM tip_pool
        WHERE expires_at <= ? OR (tips IS NULL AND (claimed_at IS NULL OR claimed_at < ?))
    """,
    # Beyond the total bound, the entries generated longest ago go.  Param: how many stay.
    delete_pool_beyond="""
        DELETE FROM tip_pool WHERE tips IS NOT NULL AND generated_at < (
            SELECT generated_at FROM tip_pool WHERE tips IS NOT NULL
            ORDER BY generated_at DESC LIMIT 1 OFFSET ?
        )
    """,
    delete_pool_of_user="DELETE FROM tip_pool WHERE user_key = ?",
    select_embedding="""
        SELECT vector FROM tip_embeddings WHERE user_key = ? AND text_hash = ? AND model = ?
    """,
    select_projection="""
        SELECT projected FROM tip_embeddings WHERE user_key = ? AND text_hash = ? AND model = ?
    """,
    insert_embedding="""
        INSERT INTO tip_embeddings (user_key, text_hash, model, vector, projected, created_at)
        VALUES (?, ?, ?, ?, ?, ?)
        ON CONFLICT (user_key, text_hash) DO UPDATE
        SET model = excluded.model, vector = excluded.vector,
            projected = excluded.projected, created_at = excluded.created_at
    """,
    delete_embeddings_of_user="DELETE FROM tip_embeddings WHERE user_key = ?",
    # One statement, so the numbers come from one snapshot on both backends.
    select_counts="""
        SELECT (SELECT COUNT(*) FROM decisions),
               (SELECT COALESCE(SUM(n_candidates), 0) FROM decisions),
               (SELECT COUNT(*) FROM policy_runs),
               (SELECT COUNT(*) FROM feedback),
               (SELECT COUNT(*) FROM rewards),
               (SELECT COUNT(*) FROM rewards WHERE source = 'default')
    """,
    # Retention (delete_expired): the oldest first, by decisions_created_idx.
    select_expired_decisions="""
        SELECT event_id FROM decisions WHERE created_at < ?
        ORDER BY created_at, event_id
        LIMIT ?
    """,
    select_chosen_of_event="""
        SELECT r.event_id, d.candidates, d.chosen_candidate_id
        FROM rewards AS r JOIN decisions AS d ON d.event_id = r.event_id
        WHERE r.event_id = ? AND r.features IS NULL
    """,
    # What a decision showed, for audits (DecisionStore.decision_candidates).
    select_candidates="""
        SELECT candidates, chosen_candidate_id, chosen_content FROM decisions WHERE event_id = ?
    """,
    delete_feedback_of_event="DELETE FROM feedback WHERE event_id = ?",
    delete_held_of_event="DELETE FROM held_feedback WHERE event_id = ?",
    delete_policy_runs_of_event="DELETE FROM policy_runs WHERE event_id = ?",
    # Rewards keep their features; see detach_rewards_of_user.
    detach_rewards_of_event="UPDATE rewards SET event_id = NULL WHERE event_id = ?",
    delete_decision="DELETE FROM decisions WHERE event_id = ?",
    delete_expired_orphan_runs="""
        DELETE FROM policy_runs
        WHERE created_at < ?
          AND NOT EXISTS (SELECT 1 FROM decisions AS d WHERE d.event_id = policy_runs.event_id)
    """,
    delete_expired_orphan_feedback="""
        DELETE FROM feedback
        WHERE received_at < ?
          AND NOT EXISTS (SELECT 1 FROM decisions AS d WHERE d.event_id = feedback.event_id)
    """,
    delete_expired_embeddings="DELETE FROM tip_embeddings WHERE created_at < ?",
)


def _log_query(
    variants: tuple[str, str, str, str], log_filter: LogFilter
) -> tuple[str, tuple[object, ...]]:
    """The statement and parameters of a filtered log read.

    ``variants`` are the statement without a filter, by prompt, by policy, and by both:
    one statement per combination keeps every query fully parameterised.
    """
    prompt_version, policy_name = log_filter.prompt_version, log_filter.policy_name
    params: list[object] = [
        _rows.db_timestamp(log_filter.since or LOG_START, what="since"),
        _rows.db_timestamp(log_filter.until or LOG_END, what="until"),
    ]
    unfiltered, by_prompt, by_policy, by_both = variants
    if prompt_version is not None and policy_name is not None:
        return by_both, (*params, prompt_version, policy_name)
    if prompt_version is not None:
        return by_prompt, (*params, prompt_version)
    if policy_name is not None:
        return by_policy, (*params, policy_name)
    return unfiltered, tuple(params)


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

    def _streaming_read(self) -> AbstractContextManager[Cursor]:
        """A read transaction whose rows arrive as they are fetched (a SQLite cursor's do)."""
        return self._transaction(write=False)

    @abc.abstractmethod
    def _transaction(self, *, write: bool) -> AbstractContextManager[Cursor]:
        """A cursor whose statements commit together on success and roll back on error.

        ``write=True`` promises the block writes, so a backend that must take its write
        lock up front (SQLite) can do so before the first read.
        """

    def _serialize_reward_writes(self, cur: Cursor) -> None:
        """Called in a write transaction right before it inserts into ``rewards``.

        ``training_events`` readers keep a watermark (the largest ``reward_id`` seen), so
        rewards must become visible in id order: a lower id committing after a higher one
        was read would be skipped forever.  Ids are drawn at INSERT, so the backend must
        make "draw an id .. commit" one critical section across all processes.  SQLite
        already does: ``write=True`` transactions are ``BEGIN IMMEDIATE`` and hold the
        database's single write lock until they end.  Postgres overrides this.
        """

    def _guard_erasure(self, cur: Cursor, *, exclusive: bool) -> None:
        """Called first in every transaction that writes event rows (shared) or erases
        (exclusive): an erasure then waits for the writes in flight, and writes that start
        after it see its tombstones.  SQLite's ``BEGIN IMMEDIATE`` already serialises every
        write; Postgres overrides this with an advisory lock."""

    def schema_version(self) -> int:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.schema_version)
            return int(cur.fetchone()[0])

    def write_decisions(self, decisions: Sequence[DecisionRecord]) -> None:
        self.write_batch(decisions, ())

    def write_policy_scores(
        self, event_id: str, runs: Sequence[PolicyScoresRecord], candidate_ids: Sequence[str]
    ) -> None:
        self.write_batch((), [PolicyScoresEntry(event_id, runs, candidate_ids)])

    def write_batch(
        self,
        decisions: Sequence[DecisionRecord],
        policy_scores: Sequence[PolicyScoresEntry],
        held: Sequence[FeedbackRecord] = (),
    ) -> int:
        rows = _rows.decision_rows(decisions)
        created_at = _rows.db_timestamp(datetime.now(UTC), what="now")
        run_rows = [
            _rows.policy_run_row(entry.event_id, run, entry.candidate_ids, created_at)
            for entry in policy_scores
            for run in entry.runs
        ]
        held_rows = [(*_rows.feedback_params(f), f.event_id) for f in held]
        if not rows.decisions and not run_rows and not held_rows:
            return 0
        # One transaction (one commit, one WAL sync) per flush, however many rows.
        with self._transaction(write=True) as cur:
            self._guard_erasure(cur, exclusive=False)
            _insert_many(cur, self._sql.insert_decision, [(*r, r[1], r[2]) for r in rows.decisions])
            dropped = 0
            if rows.decisions:
                cur.executemany(
                    self._sql.insert_dropped_event,
                    [(r[0], created_at, r[1], r[2]) for r in rows.decisions],
                )
                dropped = max(cur.rowcount, 0)
            if self.decision_outbox:
                events = [(*_rows.decision_event_params(r), r[1], r[2]) for r in rows.decisions]
                _insert_many(cur, self._sql.insert_decision_event, events)
            _insert_many(cur, self._sql.insert_policy_run, [(*r, r[0]) for r in run_rows])
            _insert_many(cur, self._sql.insert_held, held_rows)
            if dropped:
                pairs = [(r[0], r[0]) for r in rows.decisions]
                _insert_many(cur, self._sql.delete_runs_of_dropped_event, pairs)
                _insert_many(cur, self._sql.delete_held_of_dropped_event, pairs)
        return dropped

    def pending_decision_events(self, limit: int) -> list[DecisionEventRow]:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_decision_events, (limit,))
            return [_rows.decision_event_row(row) for row in cur.fetchall()]

    def delete_decision_events(self, seqs: Sequence[int]) -> None:
        # By seq, never "up to the largest": on Postgres a lower seq may commit later.
        with self._transaction(write=True) as cur:
            _insert_many(cur, self._sql.delete_decision_event, [(seq,) for seq in seqs])

    def is_erased(self, event_id: str) -> bool:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_erased_event, (event_id,))
            return cur.fetchone() is not None

    def held_feedback_ready(self, limit: int) -> list[tuple[FeedbackRecord, StoredDecision]]:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_held_ready, (limit,))
            rows = cur.fetchall()
        return [(_rows.feedback_record(r[:6]), _rows.stored_decision(r[6:])) for r in rows]

    def delete_held_feedback(self, event_ids: Sequence[str]) -> None:
        with self._transaction(write=True) as cur:
            _insert_many(cur, self._sql.delete_held, [(e,) for e in event_ids])

    def expire_held_feedback(self, received_before: datetime) -> int:
        cutoff = _rows.db_timestamp(received_before, what="received_before")
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.expire_held, (cutoff,))
            return max(cur.rowcount, 0)

    def count_held_feedback(self) -> int:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.count_held)
            return int(cur.fetchone()[0])

    def get_decision(self, event_id: str) -> StoredDecision | None:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_decision, (event_id,))
            row = cur.fetchone()
        return None if row is None else _rows.stored_decision(row)

    def record_feedback(
        self, feedback: FeedbackRecord, *, learn_within_s: float | None = None
    ) -> FeedbackOutcome:
        if learn_within_s is not None and not learn_within_s >= 0:  # also refuses NaN
            raise ValueError(f"learn_within_s must be >= 0 seconds or None, got {learn_within_s}")
        params = _rows.feedback_params(feedback)
        received_at = _rows.db_timestamp(feedback.received_at, what="received_at")
        with self._transaction(write=True) as cur:
            self._guard_erasure(cur, exclusive=False)
            cur.execute(self._sql.select_decision_for_feedback, (feedback.event_id,))
            decision = cur.fetchone()
            if decision is None:
                cur.execute(self._sql.select_erased_event, (feedback.event_id,))
                if cur.fetchone() is not None:
                    raise EventErased(f"event {feedback.event_id!r} was erased")
            in_time = decision is not None and (
                learn_within_s is None
                or (feedback.received_at - _rows.utc_datetime(decision[1])).total_seconds()
                <= learn_within_s
            )
            # Feedback first: its unique event_id decides which of two concurrent calls
            # wins, and only the winner goes on to claim the event's reward.
            shown = (None, None, None, None) if decision is None else tuple(decision)
            cur.execute(self._sql.insert_feedback, (*params, in_time, *shown))
            created = cur.fetchone() is not None
            if created and in_time:
                self._serialize_reward_writes(cur)
                cur.execute(
                    self._sql.insert_feedback_reward,
                    (feedback.event_id, float(feedback.reward), received_at),
                )
                if cur.fetchone() is None:
                    # A default reward got there first; the event keeps that one.
                    cur.execute(self._sql.mark_feedback_unlearned, (feedback.event_id,))
            # Read back rather than echo the argument: on a retry the first answer wins.
            cur.execute(self._sql.select_feedback, (feedback.event_id,))
            row = cur.fetchone()
        return _rows.feedback_outcome(row, created=created)

    def apply_default_rewards(
        self, *, older_than: datetime, reward: float, now: datetime, limit: int = 10_000
    ) -> int:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        params = (
            _rows.finite_float(reward, what="reward"),
            _rows.db_timestamp(now, what="now"),
            _rows.db_timestamp(older_than, what="older_than"),
            limit,
        )
        if limit == 0:
            return 0
        with self._transaction(write=True) as cur:
            self._serialize_reward_writes(cur)
            cur.execute(self._sql.insert_default_rewards, params)
            return len(cur.fetchall())

    def logged_events(self, log_filter: LogFilter = EVERYTHING) -> list[LoggedEvent]:
        return [event for page in self.logged_event_pages(log_filter) for event in page]

    def logged_event_pages(
        self, log_filter: LogFilter = EVERYTHING, *, page_size: int = LOG_PAGE
    ) -> Iterator[list[LoggedEvent]]:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        sql = self._sql
        statement, params = _log_query(
            (
                sql.select_logged,
                sql.select_logged_by_prompt,
                sql.select_logged_by_policy,
                sql.select_logged_by_prompt_and_policy,
            ),
            log_filter,
        )
        with self._streaming_read() as cur:
            cur.execute(statement, params)
            while rows := cur.fetchmany(page_size):
                yield [_rows.logged_event(row) for row in rows]

    def logged_policy_runs(self, log_filter: LogFilter = EVERYTHING) -> list[LoggedRuns]:
        sql = self._sql
        statement, params = _log_query(
            (
                sql.select_runs,
                sql.select_runs_by_prompt,
                sql.select_runs_by_policy,
                sql.select_runs_by_prompt_and_policy,
            ),
            log_filter,
        )
        decisions_statement, _ = _log_query(
            (
                sql.select_logged,
                sql.select_logged_by_prompt,
                sql.select_logged_by_policy,
                sql.select_logged_by_prompt_and_policy,
            ),
            log_filter,
        )
        with self._transaction(write=False) as cur:
            cur.execute(decisions_statement, params)
            decisions = cur.fetchall()
            cur.execute(statement, params)
            shadows = cur.fetchall()
        return _rows.logged_runs(decisions, shadows)

    def training_events(
        self, after_reward_id: int = 0, limit: int | None = None
    ) -> list[TrainingEvent]:
        params: tuple[int, ...]
        if limit is None:
            statement, params = self._sql.select_training_events, (after_reward_id,)
        elif limit >= 0:
            statement, params = self._sql.select_training_events_page, (after_reward_id, limit)
        else:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        with self._transaction(write=False) as cur:
            cur.execute(statement, params)
            rows = cur.fetchall()
        return [_rows.training_event(row) for row in rows]

    def outcomes_since(self, since: datetime) -> dict[str, PolicyOutcomes]:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_outcomes, (_rows.db_timestamp(since, what="since"),))
            rows = cur.fetchall()
        return {
            name: PolicyOutcomes(int(n), float(total), float(squares), int(answered), int(dis or 0))
            for name, n, total, squares, answered, dis in rows
        }

    def recent_exposures(self, user_key: str, since: datetime, limit: int) -> list[ExposureItem]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        params = (user_key, _rows.db_timestamp(since, what="since"), limit)
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_exposures, params)
            rows = cur.fetchall()
        return [ExposureItem(r[0], r[1], _rows.utc_datetime(r[2])) for r in rows]

    def user_history(self, user_key: str, limit: int) -> list[ReactionHistoryItem]:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_user_history, (user_key, limit))
            rows = cur.fetchall()
        return [_rows.history_item(row) for row in rows]

    def erase_user(self, user_key: str) -> tuple[int, int]:
        return self.erase_users([user_key])

    def erase_users(self, user_keys: Sequence[str]) -> tuple[int, int]:
        now = _rows.db_timestamp(datetime.now(UTC), what="now")
        decisions = feedback = 0
        with self._transaction(write=True) as cur:
            self._guard_erasure(cur, exclusive=True)
            for user_key in user_keys:
                cur.execute(self._sql.insert_erased_user, (user_key, now))
                cur.execute(self._sql.insert_erased_events_of_user, (now, user_key))
                cur.execute(self._sql.select_chosen_of_user, (user_key,))
                self._keep_reward_features(cur, cur.fetchall())
                cur.execute(self._sql.delete_feedback_of_user, (user_key,))
                feedback += cur.rowcount
                cur.execute(self._sql.delete_reactions_of_user, (user_key,))
                feedback += cur.rowcount
                cur.execute(self._sql.delete_held_of_user, (user_key,))
                cur.execute(self._sql.delete_policy_runs_of_user, (user_key,))
                cur.execute(self._sql.detach_rewards_of_user, (user_key,))
                cur.execute(self._sql.delete_decisions_of_user, (user_key,))
                decisions += cur.rowcount
                cur.execute(self._sql.delete_pool_of_user, (user_key,))
                cur.execute(self._sql.delete_embeddings_of_user, (user_key,))
        return decisions, feedback

    def delete_expired(self, before: datetime, *, limit: int) -> ExpiredRows:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        cutoff = _rows.db_timestamp(before, what="before")
        with self._transaction(write=True) as cur:
            # Alone, as an erasure is, and holding the rewards lock: no late row and no
            # reward may land for an event between keeping its features and deleting it.
            self._guard_erasure(cur, exclusive=True)
            self._serialize_reward_writes(cur)
            cur.execute(self._sql.select_expired_decisions, (cutoff, limit))
            events = [(row[0],) for row in cur.fetchall()]
            if not events:
                return ExpiredRows()
            chosen = []
            for event in events:
                cur.execute(self._sql.select_chosen_of_event, event)
                chosen.extend(cur.fetchall())
            self._keep_reward_features(cur, chosen)
            cur.executemany(self._sql.delete_feedback_of_event, events)
            feedback = cur.rowcount
            cur.executemany(self._sql.delete_held_of_event, events)
            cur.executemany(self._sql.delete_policy_runs_of_event, events)
            shadow_runs = cur.rowcount
            cur.executemany(self._sql.detach_rewards_of_event, events)
            cur.executemany(self._sql.delete_decision, events)
        # Each decision carried its served run.
        return ExpiredRows(
            decisions=len(events), feedback=feedback, policy_runs=len(events) + shadow_runs
        )

    def _keep_reward_features(self, cur: Cursor, chosen: Sequence[Any]) -> None:
        """Copy each (event_id, packed candidates, chosen id)'s chosen features into its
        reward, before the decision goes (erasure, retention)."""
        _insert_many(
            cur,
            self._sql.keep_reward_features,
            [
                (
                    packing.pack_vector(
                        _rows.chosen_features(packed, chosen_id), what=f"{event_id}: features"
                    ),
                    event_id,
                )
                for event_id, packed, chosen_id in chosen
            ],
        )

    def decision_candidates(self, event_id: str) -> list[CandidateRecord]:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_candidates, (event_id,))
            row = cur.fetchone()
        return [] if row is None else _rows.candidate_records(*row)

    def delete_expired_leftovers(self, before: datetime) -> ExpiredRows:
        cutoff = (_rows.db_timestamp(before, what="before"),)
        # No erasure lock: these rows have no decision, so nothing learns from them and
        # no write of a decision waits for this.
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.delete_expired_orphan_runs, cutoff)
            runs = cur.rowcount
            cur.execute(self._sql.delete_expired_orphan_feedback, cutoff)
            feedback = cur.rowcount
            cur.execute(self._sql.delete_expired_embeddings, cutoff)
            embeddings = cur.rowcount
        return ExpiredRows(feedback=feedback, policy_runs=runs, embeddings=embeddings)

    def counts(self) -> StoreCounts:
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.select_counts)
            return _rows.store_counts(cur.fetchone())

    # -- the candidate pool ------------------------------------------------------------

    def read_pool_entry(self, key: PoolKey, now: datetime) -> PoolEntry | None:
        params = (*_pool_key(key), _rows.db_timestamp(now, what="now"))
        with self._transaction(write=False) as cur:
            cur.execute(self._sql.read_pool_entry, params)
            row = cur.fetchone()
        return None if row is None else _rows.pool_entry(key, row)

    def count_pool_serves(self, serves: Mapping[tuple[PoolKey, datetime], int]) -> None:
        rows = [
            (count, *_pool_key(key), _rows.db_timestamp(generated_at, what="generated_at"))
            for (key, generated_at), count in serves.items()
            if count > 0
        ]
        if rows:
            with self._transaction(write=True) as cur:
                _insert_many(cur, self._sql.count_pool_serves, rows)

    def claim_pool_refill(self, key: PoolKey, now: datetime, stale_before: datetime) -> str | None:
        claim = _rows.db_timestamp(now, what="now")
        stale = _rows.db_timestamp(stale_before, what="stale_before")
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.claim_pool_refill, (*_pool_key(key), claim, stale))
            return claim if cur.fetchone() is not None else None

    def fill_pool_entry(
        self,
        key: PoolKey,
        claim: str,
        tips: Sequence[PoolTip],
        *,
        model: str | None,
        judge_version: str | None,
        now: datetime,
        expires_at: datetime,
    ) -> bool:
        params = (
            _rows.pool_tips_json(tips),
            _rows.db_text(model),
            _rows.db_text(judge_version),
            _rows.db_timestamp(now, what="now"),
            _rows.db_timestamp(expires_at, what="expires_at"),
            *_pool_key(key),
            claim,
        )
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.fill_pool_entry, params)
            filled = cur.rowcount > 0
            if filled:
                cur.execute(self._sql.delete_other_task_sets, (key.user_key, key.fingerprint))
        return filled

    def release_pool_claim(self, key: PoolKey, claim: str) -> None:
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.release_pool_claim, (*_pool_key(key), claim))

    def clean_pool(self, now: datetime, *, stale_before: datetime, max_entries: int) -> int:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        params = (
            _rows.db_timestamp(now, what="now"),
            _rows.db_timestamp(stale_before, what="stale_before"),
        )
        with self._transaction(write=True) as cur:
            cur.execute(self._sql.delete_expired_pool, params)
            removed = max(cur.rowcount, 0)
            cur.execute(self._sql.delete_pool_beyond, (max_entries - 1,))
            return removed + max(cur.rowcount, 0)

    def cached_embeddings(
        self, user_key: str, text_hashes: Sequence[str], model: str
    ) -> dict[str, list[float]]:
        return self._cached(self._sql.select_embedding, user_key, text_hashes, model)

    def cached_projections(
        self, user_key: str, text_hashes: Sequence[str], model: str
    ) -> dict[str, list[float]]:
        return self._cached(self._sql.select_projection, user_key, text_hashes, model)

    def _cached(
        self, statement: str, user_key: str, text_hashes: Sequence[str], model: str
    ) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        with self._transaction(write=False) as cur:
            for text_hash in dict.fromkeys(text_hashes):
                cur.execute(statement, (user_key, text_hash, model))
                row = cur.fetchone()
                if row is not None:
                    found[text_hash] = _rows.float_list(row[0])
        return found

    def cache_embeddings(
        self,
        user_key: str,
        vectors: Mapping[str, tuple[Sequence[float], Sequence[float]]],
        model: str,
        now: datetime,
    ) -> None:
        created_at = _rows.db_timestamp(now, what="now")
        rows = [
            (
                user_key,
                h,
                model,
                _rows.db_floats(vector, what=f"embedding {h}"),
                _rows.db_floats(projected, what=f"projection {h}"),
                created_at,
            )
            for h, (vector, projected) in vectors.items()
        ]
        with self._transaction(write=True) as cur:
            _insert_many(cur, self._sql.insert_embedding, rows)


def _pool_key(key: PoolKey) -> tuple[str, str, str]:
    return (key.user_key, key.fingerprint, key.prompt_version)
