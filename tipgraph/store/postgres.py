"""Postgres backend: psycopg 3 with a connection pool, optionally confined to one schema."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from tipgraph.store._sql import QMARK_STATEMENTS, Cursor, SQLDecisionStore, Statements, pyformat
from tipgraph.store.base import RowRejected, StoreError, StoreUnavailable
from tipgraph.store.migrate import open_schema

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

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

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
        pool = self._pool
        if pool is None:
            raise StoreError("the Postgres store is not open; call open() first")
        try:
            with pool.connection() as conn, conn.cursor() as cur:
                yield cur
        except psycopg.OperationalError as err:
            # Includes PoolTimeout and PoolClosed (a close() racing this call).
            raise StoreUnavailable(f"Postgres is unavailable: {err}") from err
        except (psycopg.DataError, psycopg.IntegrityError) as err:
            raise RowRejected(f"Postgres refused the row: {err}") from err
