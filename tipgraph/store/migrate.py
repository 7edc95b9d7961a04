"""Versioned schema migrations: ``migrations/NNNN_name.<dialect>.sql``, applied in order.

Each pending migration runs in its own transaction together with its row in
``schema_migrations``, so a crash leaves the schema at a clean version.  The runner does
not connect by itself: the backend hands it transactions, which keeps one code path for
both databases and lets several processes (Ray replicas) start at once:

* SQLite: the backend's write transaction is ``BEGIN IMMEDIATE``, so the second process
  waits (``busy_timeout``) and then finds the migration already recorded.
* Postgres: every step first takes a transaction-scoped advisory lock, which also
  serialises ``CREATE SCHEMA IF NOT EXISTS`` / ``CREATE TABLE IF NOT EXISTS`` (both race
  on the catalog without it).
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import psycopg
from psycopg import sql

from tipgraph.store._sql import Cursor
from tipgraph.store.base import MigrationError
from tipgraph.store.conversions import DATA_STEPS

logger = logging.getLogger(__name__)

Dialect = Literal["sqlite", "postgres"]
Transaction = Callable[[], AbstractContextManager[Cursor]]

_FILE_NAME = re.compile(r"^(?P<version>\d+)_(?P<name>\w+)\.(?P<dialect>sqlite|postgres)\.sql$")

# Any fixed bigint works; all tipgraph processes just have to agree on it.  ("tipgraph")
POSTGRES_LOCK_KEY = 0x7469706772617068

_BOOKKEEPING: dict[Dialect, str] = {
    "sqlite": """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            name       TEXT NOT NULL,
            applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
        )
    """,
    "postgres": """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version    INTEGER PRIMARY KEY,
            name       TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )
    """,
}
_RECORD: dict[Dialect, str] = {
    "sqlite": "INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
    "postgres": "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
}
_APPLIED = "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(dialect: Dialect) -> list[Migration]:
    """The migrations shipped for ``dialect``, by version.

    Read through ``importlib.resources`` so an installed wheel finds its own copies.
    """
    found: dict[int, Migration] = {}
    folder = resources.files("tipgraph.store").joinpath("migrations")
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None or match["dialect"] != dialect:
            continue
        version = int(match["version"])
        if version in found:
            raise MigrationError(
                f"two {dialect} migrations share version {version}: "
                f"{found[version].name!r} and {match['name']!r}"
            )
        found[version] = Migration(version, match["name"], entry.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


def pending_migrations(applied: int, shipped: Sequence[Migration]) -> list[Migration]:
    """What to run on a database at version ``applied``.

    A database ahead of this code was migrated by a newer release; writing to it could
    corrupt data that release relies on, so refuse instead.
    """
    latest = shipped[-1].version if shipped else 0
    if applied > latest:
        raise MigrationError(
            f"the database schema is at version {applied} but this code ships migrations "
            f"only up to {latest}; upgrade tipgraph instead of downgrading the schema"
        )
    return [migration for migration in shipped if migration.version > applied]


def split_sqlite_script(script: str) -> list[str]:
    """Split a script into single statements, which is all ``sqlite3`` ``execute`` accepts.

    ``executescript`` is no alternative: it commits the open transaction first, which
    would separate a migration from its ``schema_migrations`` row.  ``complete_statement``
    knows about quotes, comments and trigger bodies, so a ``;`` inside them does not split.
    """
    statements: list[str] = []
    buffer = ""
    for piece in script.split(";"):
        buffer += piece + ";"
        if sqlite3.complete_statement(buffer):
            if _has_code(buffer):
                statements.append(buffer.strip())
            buffer = ""
    if _has_code(buffer.removesuffix(";")):
        raise MigrationError(f"incomplete SQL statement at the end of a migration: {buffer!r}")
    return statements


def _has_code(text: str) -> bool:
    return any(
        line.strip() and not line.strip().startswith("--") and line.strip() != ";"
        for line in text.splitlines()
    )


def _prepare(cur: Cursor, dialect: Dialect, pg_schema: str | None) -> None:
    if dialect == "postgres":
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (POSTGRES_LOCK_KEY,))
        if pg_schema is not None:
            # Only when missing: CREATE SCHEMA IF NOT EXISTS needs the right to create
            # schemas in the database even when there is nothing to create, which a role
            # that owns just its schema (k3s: tipgraph_app) does not have.
            cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (pg_schema,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(pg_schema)))
    cur.execute(_BOOKKEEPING[dialect])


_DATA_STEP = re.compile(r"^-- @data (\w+)[ \t]*$", re.MULTILINE)


def _run_script(cur: Cursor, dialect: Dialect, script: str) -> None:
    """The script's SQL, and at each ``-- @data <name>`` line the Python data step of that
    name (:data:`tipgraph.store.conversions.DATA_STEPS`), all on ``cur``."""
    parts = _DATA_STEP.split(script)
    for i, part in enumerate(parts):
        if i % 2:
            step = DATA_STEPS.get(part)
            if step is None:
                raise MigrationError(f"a migration names an unknown data step {part!r}")
            step(cur, dialect)
        elif not _has_code(part):
            continue
        elif dialect == "postgres":
            cur.execute(part)  # without parameters psycopg sends a whole script at once
        else:
            for statement in split_sqlite_script(part):
                cur.execute(statement)


def migrate(transaction: Transaction, dialect: Dialect, *, pg_schema: str | None = None) -> int:
    """Apply every pending migration and return the schema version. Idempotent.

    ``transaction`` must return a write transaction (see the module docstring).  With
    ``pg_schema`` the schema is created first; the backend's connections must already have
    it on their ``search_path`` so the unqualified names in the scripts land there.
    """
    shipped = load_migrations(dialect)
    if not shipped:
        raise MigrationError(f"no {dialect} migrations found in tipgraph.store/migrations")
    while True:
        with transaction() as cur:
            _prepare(cur, dialect, pg_schema)
            cur.execute(_APPLIED)
            applied = int(cur.fetchone()[0])
            pending = pending_migrations(applied, shipped)
            if not pending:
                return applied
            step = pending[0]
            _run_script(cur, dialect, step.sql)
            cur.execute(_RECORD[dialect], (step.version, step.name))
        logger.info("applied %s migration %04d_%s", dialect, step.version, step.name)


def open_schema(
    transaction: Callable[[bool], AbstractContextManager[Cursor]],
    dialect: Dialect,
    *,
    apply: bool,
    pg_schema: str | None = None,
) -> int:
    """A store's schema on open: :func:`migrate` it, or with ``apply=False`` only
    :func:`check_current` it.  ``transaction(write)`` gives the store's transactions."""
    if apply:
        return migrate(lambda: transaction(True), dialect, pg_schema=pg_schema)
    return check_current(lambda: transaction(False), dialect)


def check_current(transaction: Transaction, dialect: Dialect) -> int:
    """The schema version, if it is the one this code ships; never writes.

    For processes whose database role may only read (``store.migrate: false``, the tuning
    job): another process (``tipgraph serve``) migrates, this one refuses a schema it does
    not know instead of failing on its first query.
    """
    shipped = load_migrations(dialect)
    try:
        with transaction() as cur:
            cur.execute(_APPLIED)
            applied = int(cur.fetchone()[0])
    except (sqlite3.OperationalError, psycopg.errors.UndefinedTable) as err:
        raise MigrationError(
            f"the store has no tipgraph schema yet, or this role may not read it ({err}); "
            "start something that migrates it (tipgraph serve), or open it with "
            "store.migrate: true"
        ) from err
    if pending_migrations(applied, shipped):
        raise MigrationError(
            f"the database schema is at version {applied} but this code needs "
            f"{shipped[-1].version}; start something that migrates it (tipgraph serve), or "
            "open it with store.migrate: true"
        )
    return applied
