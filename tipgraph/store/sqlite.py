"""SQLite backend: one file shared by every local process (each Ray replica opens it).

One connection per store, shared by the store's threads under a lock.  WAL lets readers
run while another process writes; ``busy_timeout`` makes writers queue instead of failing;
every write transaction is ``BEGIN IMMEDIATE`` so it takes the write lock before its first
read and can never deadlock upgrading a read lock.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tipgraph.store._sql import QMARK_STATEMENTS, Cursor, SQLDecisionStore
from tipgraph.store.base import RowRejected, StoreError, StoreUnavailable
from tipgraph.store.migrate import open_schema

logger = logging.getLogger(__name__)

URL_PREFIX = "sqlite:///"
MEMORY = ":memory:"
BUSY_TIMEOUT_S = 10.0

# Primary result codes that mean "the file is busy or unreachable", not "your SQL is wrong".
_TRANSIENT_CODES = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN}
)


def sqlite_path(url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db`` (relative to the working directory),
    ``sqlite:////abs.db`` -> ``/abs.db``, ``sqlite:///:memory:`` -> ``:memory:``."""
    path = url.removeprefix(URL_PREFIX)
    if not url.startswith(URL_PREFIX) or not path:
        raise ValueError(
            f"SQLite URL must look like sqlite:///relative.db or sqlite:////absolute.db, "
            f"got {url!r}"
        )
    return path


def _is_transient(err: sqlite3.Error) -> bool:
    return (getattr(err, "sqlite_errorcode", 0) & 0xFF) in _TRANSIENT_CODES


class SQLiteStore(SQLDecisionStore):
    """Decision store in a local SQLite file (or ``:memory:``, for one process only)."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        """``migrate=False``: only check that the schema is current."""
        super().__init__(QMARK_STATEMENTS)
        self.url = url
        self.migrate = migrate
        self.path = sqlite_path(url)
        # Reentrant: open() holds it while migrate() runs transactions through it.
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None

    def open(self) -> None:
        with self._lock:
            if self._conn is not None:
                return
            try:
                self._conn = self._connect()
                open_schema(
                    lambda write: self._transaction(write=write), "sqlite", apply=self.migrate
                )
            except BaseException:
                self.close()
                raise
            logger.info("opened SQLite store %s", self.path)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connect(self) -> sqlite3.Connection:
        # Without migrating, never write: read-only, no directory, file or WAL switch made.
        read_only = not self.migrate and self.path != MEMORY
        try:
            if self.path != MEMORY and not read_only:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # timeout= is SQLite's busy_timeout.  isolation_level=None: no implicit BEGIN,
            # _transaction says when a transaction starts and of which kind.
            conn = sqlite3.connect(
                f"{Path(self.path).resolve().as_uri()}?mode=ro" if read_only else self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
                uri=read_only,
            )
        except (OSError, sqlite3.OperationalError) as err:
            raise StoreUnavailable(f"cannot open SQLite database {self.path}: {err}") from err
        try:
            if not read_only:
                _enable_wal(conn)
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as err:
            conn.close()
            if _is_transient(err):
                raise StoreUnavailable(f"cannot set up SQLite database {self.path}: {err}") from err
            raise
        return conn

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Cursor]:
        with self._lock:
            if self._conn is None:
                raise StoreError("the SQLite store is not open; call open() first")
            conn = self._conn
            cur = conn.cursor()
            try:
                if write:
                    cur.execute("BEGIN IMMEDIATE")
                yield cur
                if write:
                    conn.commit()
            except BaseException as err:
                if conn.in_transaction:
                    conn.rollback()
                if isinstance(err, sqlite3.Error) and _is_transient(err):
                    raise StoreUnavailable(f"SQLite database {self.path} is busy: {err}") from err
                if isinstance(err, sqlite3.IntegrityError | sqlite3.DataError | OverflowError):
                    raise RowRejected(f"SQLite refused the row: {err}") from err
                raise
            finally:
                cur.close()


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL once, tolerating other processes doing the same.

    Changing the journal mode needs an exclusive lock and SQLite reports SQLITE_BUSY for it
    without consulting the busy timeout, so replicas opening a new file together retry.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.01
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if not _is_transient(err) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
