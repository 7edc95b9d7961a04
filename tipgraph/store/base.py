"""The decision-log interface shared by the SQLite and Postgres backends."""

from __future__ import annotations

import abc
from collections.abc import Sequence

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


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or refused the operation for a transient reason."""


class MigrationError(StoreError):
    """The schema on disk is newer than, or inconsistent with, the migrations shipped."""


class DecisionStore(abc.ABC):
    """Append-mostly log of decisions, per-policy scores and feedback.

    Every write is idempotent on its natural key so a retry never duplicates a row:
    decisions on ``event_id``, policy runs on ``(event_id, policy_name)``, feedback on
    ``event_id``.  Implementations are thread-safe; callers in asyncio code run them in a
    worker thread.
    """

    @abc.abstractmethod
    def open(self) -> None:
        """Connect and apply pending migrations. Idempotent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. Idempotent."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """Highest migration applied."""

    @abc.abstractmethod
    def write_decisions(self, decisions: Sequence[DecisionRecord]) -> None:
        """Insert decisions with their candidates and the served policy's scores, atomically."""

    @abc.abstractmethod
    def write_policy_scores(
        self, event_id: str, runs: Sequence[PolicyScoresRecord], candidate_ids: Sequence[str]
    ) -> None:
        """Insert shadow (or late) policy runs; ``candidate_ids`` aligns scores to candidates."""

    @abc.abstractmethod
    def get_decision(self, event_id: str) -> StoredDecision | None:
        """The decision with the chosen candidate's features, or None if unknown."""

    @abc.abstractmethod
    def record_feedback(self, feedback: FeedbackRecord) -> FeedbackOutcome:
        """Insert feedback unless this event already has some; return what is stored."""

    @abc.abstractmethod
    def training_events(self, after_feedback_id: int = 0) -> list[TrainingEvent]:
        """Every (chosen features, reward) with ``feedback_id > after_feedback_id``, in order."""

    @abc.abstractmethod
    def user_history(self, user_key: str, limit: int) -> list[ReactionHistoryItem]:
        """The user's most recent reactions with the kind of tip they reacted to, newest first."""

    @abc.abstractmethod
    def counts(self) -> StoreCounts:
        """Row counts, for status pages and tests."""

    def __enter__(self) -> DecisionStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
