"""The decision log: decisions, per-policy scores and feedback, in SQLite or Postgres.

Callers depend on :class:`DecisionStore` and get one from :func:`make_store` /
:func:`open_store`, which pick the backend from ``store.url``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tipgraph.store.base import (
    DecisionStore,
    EventErased,
    MigrationError,
    RowRejected,
    StoreError,
    StoreUnavailable,
)
from tipgraph.store.filters import EVERYTHING, LogFilter
from tipgraph.store.postgres import PostgresStore
from tipgraph.store.records import (
    CandidateRecord,
    DecisionRecord,
    ExpiredRows,
    ExposureItem,
    FeedbackOutcome,
    FeedbackRecord,
    LoggedEvent,
    LoggedPolicyRun,
    LoggedRuns,
    PolicyOutcomes,
    PolicyRole,
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
from tipgraph.store.sqlite import SQLiteStore

if TYPE_CHECKING:
    from tipgraph.settings import StoreSettings

__all__ = [
    "EVERYTHING",
    "CandidateRecord",
    "DecisionRecord",
    "DecisionStore",
    "EventErased",
    "ExpiredRows",
    "ExposureItem",
    "FeedbackOutcome",
    "FeedbackRecord",
    "LogFilter",
    "LoggedEvent",
    "LoggedPolicyRun",
    "LoggedRuns",
    "MigrationError",
    "PolicyOutcomes",
    "PolicyRole",
    "PolicyScoresEntry",
    "PolicyScoresRecord",
    "PoolEntry",
    "PoolKey",
    "PoolTip",
    "PostgresStore",
    "ReactionHistoryItem",
    "RowRejected",
    "SQLiteStore",
    "StoreCounts",
    "StoreError",
    "StoreUnavailable",
    "StoredDecision",
    "TrainingEvent",
    "make_store",
    "open_store",
]


def make_store(settings: StoreSettings) -> DecisionStore:
    """The backend ``settings.url`` names, configured but not connected yet."""
    scheme = settings.url.partition(":")[0]
    if scheme == "sqlite":
        return SQLiteStore(settings.url, migrate=settings.migrate)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(
            settings.url,
            schema=settings.pg_schema,
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            timeout=settings.timeout_s,
            migrate=settings.migrate,
        )
    raise ValueError(f"store.url must start with sqlite:// or postgresql://, got {settings.url!r}")


def open_store(settings: StoreSettings, *, decision_outbox: bool = False) -> DecisionStore:
    """:func:`make_store`, connected and migrated (or checked current, with
    ``store.migrate: false``); the caller closes it.  ``decision_outbox``: this store's
    decisions also write their events to the outbox (the decision writers, with
    ``bus.decision_events`` on)."""
    store = make_store(settings)
    store.decision_outbox = decision_outbox
    store.open()
    return store
