"""Postgres backend: psycopg 3 with a connection pool, optionally confined to one schema."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from tipgraph.store import partitions
from tipgraph.store._sql import QMARK_STATEMENTS, Cursor, SQLDecisionStore, Statements, pyformat
from tipgraph.store.base import RowRejected, StoreError, StoreUnavailable
from tipgraph.store.migrate import open_schema
from tipgraph.store.partitions import WeekPartition
from tipgraph.store.records import ExpiredRows

logger = logging.getLogger(__name__)

Connection = psycopg.Connection[tuple[Any, ...]]


POSTGRES_STATEMENTS: Statements = QMARK_STATEMENTS.translated(pyformat)


# Any fixed bigint works, as long as every tipgraph process agrees on it and it differs
# from the migration lock (tipgraph.store.migrate.POSTGRES_LOCK_KEY).  ("tiprewrd")
REWARDS_LOCK_KEY = 0x7469707265777264
_LOCK_REWARDS = "SELECT pg_advisory_xact_lock(%s)"
ERASURE_LOCK_KEY = 0x7469706572617365  # "tiperase"
_LOCK_ERASURE = "SELECT pg_advisory_xact_lock(%s)"
_LOCK_ERASURE_SHARED = "SELECT pg_advisory_xact_lock_shared(%s)"
PARTITIONS_LOCK_KEY = 0x7469707061727473  # "tipparts"
_LOCK_PARTITIONS = "SELECT pg_advisory_xact_lock(%s)"
DETACH_CHUNK = 1000
"""Decisions per transaction when retention clears a week before dropping it."""


def _search_path(schema: str) -> Callable[[Connection], None]:
    """Pool ``configure`` hook: new connections see the store's schema first."""

    def configure(conn: Connection) -> None:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.commit()  # the pool wants connections handed over idle

    return configure


class PostgresStore(SQLDecisionStore):
    """Decision store in Postgres.

    With ``schema`` every table lives in that schema (created on open): each pooled
    connection gets it as its ``search_path``, so the SQL stays unqualified.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 4,
        timeout: float = 30.0,
        migrate: bool = True,
    ) -> None:
        """``migrate=False``: only check that the schema is current (a read-only role)."""
        super().__init__(POSTGRES_STATEMENTS)
        self.url = url
        self.schema = schema
        self.migrate = migrate
        self.min_size = min_size
        self.max_size = max_size
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Connection] | None = None

    def open(self) -> None:
        with self._lock:
            if self._pool is not None:
                return
            # A closed pool cannot be reopened, so each open() builds a fresh one.
            pool: ConnectionPool[Connection] = ConnectionPool(
                self.url,
                min_size=self.min_size,
                max_size=self.max_size,
                open=False,
                configure=None if self.schema is None else _search_path(self.schema),
                check=ConnectionPool.check_connection,
                timeout=self.timeout,
                name="tipgraph-store",
            )
            self._pool = pool
            try:
                try:
                    pool.open(wait=True, timeout=self.timeout)
                except psycopg.OperationalError as err:
                    raise StoreUnavailable(f"cannot connect to Postgres: {err}") from err
                open_schema(
                    lambda write: self._transaction(write=write),
                    "postgres",
                    apply=self.migrate,
                    pg_schema=self.schema,
                )
            except BaseException:
                self._pool = None
                pool.close()
                raise
            logger.info("opened Postgres store (schema %s)", self.schema or "default")
        self.maintain_partitions(datetime.now(UTC))

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def maintain_partitions(self, now: datetime) -> list[str]:
        if not self.migrate:
            return []  # a role that only reads and writes rows makes no tables
        with self._transaction(write=True) as cur:
            cur.execute(_LOCK_PARTITIONS, (PARTITIONS_LOCK_KEY,))
            return partitions.ensure_ahead(cur, now)

    def drop_expired_partitions(self, before: datetime) -> ExpiredRows:
        with self._transaction(write=False) as cur:
            weeks = partitions.expired_weeks(cur, before)
        expired = ExpiredRows()
        for week in weeks:
            expired += self._drop_week(week, before)
        return expired

    def _drop_week(self, week: WeekPartition, before: datetime) -> ExpiredRows:
        """Drop ``week``: first, a chunk of its decisions per transaction and without a
        lock (writers never wait on it), their rewards keep their features and lose their
        event id, and their feedback, held feedback and shadow runs go; then, alone, the
        same for the rewards and feedback that came since, and the drop."""
        table = sql.Identifier(week.name)
        with self._transaction(write=False) as cur:
            cur.execute(
                "SELECT (SELECT COALESCE(MAX(reward_id), 0) FROM rewards), "
                "(SELECT COALESCE(MAX(feedback_id), 0) FROM feedback)"
            )
            rewards_seen, feedback_seen = map(int, cur.fetchone())
        expired = self._clear_week(week)
        with self._transaction(write=True) as cur:
            # Alone, as delete_expired is: no reward or late row for these events lands
            # between keeping the features and the drop.
            self._guard_erasure(cur, exclusive=True)
            self._serialize_reward_writes(cur)
            cur.execute(_LOCK_PARTITIONS, (PARTITIONS_LOCK_KEY,))
            if week not in partitions.expired_weeks(cur, before):
                return ExpiredRows()  # another replica's retention dropped it
            # Reward ids are committed in order (see _serialize_reward_writes), so the
            # rewards that came since the chunks began are above the largest id seen then.
            cur.execute(
                sql.SQL(
                    "SELECT d.event_id, d.candidates, d.chosen_candidate_id "
                    "FROM rewards AS r JOIN {} AS d ON d.event_id = r.event_id "
                    "WHERE r.reward_id > %s"
                ).format(table),
                (rewards_seen,),
            )
            self._detach_rewards(cur, cur.fetchall())
            # Feedback ids are drawn without a lock, so one drawn before the chunks began
            # may commit after its chunk went by: it is left to delete_expired_leftovers.
            cur.execute(
                sql.SQL(
                    "DELETE FROM feedback AS f USING {} AS d "
                    "WHERE d.event_id = f.event_id AND f.feedback_id > %s"
                ).format(table),
                (feedback_seen,),
            )
            late_feedback = cur.rowcount
            cur.execute(
                sql.SQL(
                    "DELETE FROM held_feedback WHERE event_id IN (SELECT event_id FROM {})"
                ).format(table)
            )
            cur.execute(sql.SQL("SELECT COUNT(*) FROM {}").format(table))
            decisions = int(cur.fetchone()[0])
            cur.execute(sql.SQL("DROP TABLE {}").format(table))
        logger.info("retention dropped %s (%d decisions)", week.name, decisions)
        # Each decision carried its served run.
        return expired + ExpiredRows(
            decisions=decisions, feedback=late_feedback, policy_runs=decisions
        )

    def _clear_week(self, week: WeekPartition) -> ExpiredRows:
        """For ``week``'s decisions, a chunk per transaction by event id: rewards keep their
        features and lose their event id (:meth:`_detach_rewards`); feedback, held feedback
        and shadow runs go.  Returns the feedback and runs deleted."""
        table = sql.Identifier(week.name)
        select_ids = sql.SQL(
            "SELECT event_id FROM {} WHERE event_id > %s ORDER BY event_id LIMIT %s"
        ).format(table)
        select_rewarded = sql.SQL(
            "SELECT d.event_id, d.candidates, d.chosen_candidate_id "
            "FROM {} AS d JOIN rewards AS r ON r.event_id = d.event_id "
            "WHERE d.event_id = ANY(%s)"
        ).format(table)
        cleared, after = ExpiredRows(), ""
        while True:
            with self._transaction(write=True) as cur:
                cur.execute(select_ids, (after, DETACH_CHUNK))
                ids = [row[0] for row in cur.fetchall()]
                if not ids:
                    return cleared
                cur.execute(select_rewarded, (ids,))
                self._detach_rewards(cur, cur.fetchall())
                cur.execute("DELETE FROM feedback WHERE event_id = ANY(%s)", (ids,))
                feedback = cur.rowcount
                cur.execute("DELETE FROM held_feedback WHERE event_id = ANY(%s)", (ids,))
                cur.execute("DELETE FROM policy_runs WHERE event_id = ANY(%s)", (ids,))
                cleared += ExpiredRows(feedback=feedback, policy_runs=cur.rowcount)
            after = ids[-1]

    def _detach_rewards(self, cur: Cursor, chosen: list[tuple[Any, ...]]) -> None:
        """Each (event_id, packed candidates, chosen id)'s reward keeps its chosen features
        and loses its event id, as a deleted decision's reward does."""
        if not chosen:
            return
        self._keep_reward_features(cur, chosen)
        cur.execute(
            "UPDATE rewards SET event_id = NULL WHERE event_id = ANY(%s)",
            ([row[0] for row in chosen],),
        )

    def _serialize_reward_writes(self, cur: Cursor) -> None:
        """Take the rewards lock, held until this transaction commits or rolls back.

        An identity value is drawn at INSERT but becomes visible at COMMIT, so without this
        two writers could commit ids 8 and 7 in that order, and a reader that saw 8 first
        would skip 7 forever.  With every reward-inserting transaction drawing its ids under
        one lock, and Postgres marking a transaction committed before releasing its locks,
        ids become visible in increasing order (gaps from rollbacks are never filled, which
        a watermark reader does not mind).  The cost is that reward writes, which are one
        or two short statements, run one at a time across all processes.
        """
        cur.execute(_LOCK_REWARDS, (REWARDS_LOCK_KEY,))

    def _guard_erasure(self, cur: Cursor, *, exclusive: bool) -> None:
        """Writers share the erasure lock, an erasure takes it alone, until commit: the
        tombstone check of a write and the erasure cannot interleave (READ COMMITTED would
        otherwise let a write that checked before the erasure committed land after it)."""
        cur.execute(_LOCK_ERASURE if exclusive else _LOCK_ERASURE_SHARED, (ERASURE_LOCK_KEY,))

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Cursor]:
        # Every block is one Postgres transaction, reads included; ``write`` changes nothing.
        with self._connection() as conn, conn.cursor() as cur:
            yield cur

    @contextmanager
    def _streaming_read(self) -> Iterator[Cursor]:
        # A server-side cursor: fetchmany brings each page over as it is asked for, where
        # a client cursor would hold the whole result in memory at once.
        with self._connection() as conn, conn.cursor(name="tipgraph_stream") as cur:
            yield cur

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        pool = self._pool
        if pool is None:
            raise StoreError("the Postgres store is not open; call open() first")
        try:
            with pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as err:
            # Includes PoolTimeout and PoolClosed (a close() racing this call).
            raise StoreUnavailable(f"Postgres is unavailable: {err}") from err
        except (psycopg.DataError, psycopg.IntegrityError) as err:
            raise RowRejected(f"Postgres refused the row: {err}") from err
