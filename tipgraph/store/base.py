"""The decision-log interface shared by the SQLite and Postgres backends."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime

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


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or refused the operation for a transient reason."""


class RowRejected(ValueError):
    """The database refused the data itself (a constraint, a value out of range): trying
    again cannot help, unlike :class:`StoreUnavailable`."""


class EventErased(LookupError):
    """The event's decision was erased: nothing about it may be stored again."""


class MigrationError(StoreError):
    """The schema on disk is newer than, or inconsistent with, the migrations shipped."""


class DecisionStore(abc.ABC):
    """Append-mostly log of decisions, per-policy probabilities, feedback and rewards.

    Feedback is what users said; rewards are what the policies learn from.  They differ
    because feedback may come too late to learn from, and a decision nobody answers in
    time gets a default reward instead.  Each decision has at most one reward, whichever
    of its feedback or its default came first.

    Every write is idempotent on its natural key so a retry never duplicates a row:
    decisions on ``event_id``, policy runs on ``(event_id, policy_name)``, feedback and
    rewards on ``event_id``.  Implementations are thread-safe and safe to share one
    database between processes; callers in asyncio code run them in a worker thread.
    """

    decision_outbox = False
    """Write each decision's event to the outbox in the decision's transaction, for
    :class:`tipgraph.decision_events.DecisionEventRelay` to publish (``bus.decision_events``);
    set by :func:`tipgraph.store.open_store`."""

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
    def write_batch(
        self,
        decisions: Sequence[DecisionRecord],
        policy_scores: Sequence[PolicyScoresEntry],
        held: Sequence[FeedbackRecord] = (),
    ) -> int:
        """Decisions, policy runs and held feedback in one transaction: what the decision
        log writes per flush.  Rows of an erased user or event are dropped there (and a
        dropped decision's event is tombstoned too); returns how many decisions were."""

    @abc.abstractmethod
    def pending_decision_events(self, limit: int) -> list[DecisionEventRow]:
        """The outbox's oldest events, in the order they were stored."""

    @abc.abstractmethod
    def delete_decision_events(self, seqs: Sequence[int]) -> None:
        """Remove published events from the outbox."""

    @abc.abstractmethod
    def is_erased(self, event_id: str) -> bool:
        """Whether the event's decision was erased (or dropped on arrival after an erasure)."""

    @abc.abstractmethod
    def held_feedback_ready(self, limit: int) -> list[tuple[FeedbackRecord, StoredDecision]]:
        """Held feedback whose decision is readable now, with that decision, oldest first,
        at most ``limit``."""

    @abc.abstractmethod
    def delete_held_feedback(self, event_ids: Sequence[str]) -> None:
        """Forget held feedback (applied, or refused for good)."""

    @abc.abstractmethod
    def expire_held_feedback(self, received_before: datetime) -> int:
        """Delete held feedback received before then whose decision never appeared."""

    @abc.abstractmethod
    def count_held_feedback(self) -> int:
        """Held feedback waiting, across every replica."""

    @abc.abstractmethod
    def get_decision(self, event_id: str) -> StoredDecision | None:
        """The decision with the chosen candidate's features, or None if unknown."""

    @abc.abstractmethod
    def decision_candidates(self, event_id: str) -> list[CandidateRecord]:
        """Every candidate of the decision as logged, in position order ([] if unknown):
        what an audit of one decision reads."""

    @abc.abstractmethod
    def record_feedback(
        self, feedback: FeedbackRecord, *, learn_within_s: float | None = None
    ) -> FeedbackOutcome:
        """Store feedback unless the event already has some, and learn from it if in time.

        One transaction.  The first feedback for an event wins; a later call changes
        nothing and returns the stored record with its stored ``learned`` flag and reward.
        New feedback is learned (a ``'feedback'`` reward row with ``feedback.reward``,
        created at ``received_at``) only if the decision is logged, no reward exists for it
        yet (a default may have come first), and, with ``learn_within_s``, it was received
        at most that many seconds after the decision: a policy that learns a reaction long
        after the tip was shown would learn about a context that no longer holds.

        Raises ValueError for a reaction the store does not know, naive datetimes, or a
        negative ``learn_within_s``.
        """

    @abc.abstractmethod
    def apply_default_rewards(
        self, *, older_than: datetime, reward: float, now: datetime, limit: int = 10_000
    ) -> int:
        """Give each decision made before ``older_than`` that has no reward yet ``reward``.

        Silence is information too: without it the policies only learn from users who
        answer.  Feedback that arrived too late does not prevent a default.  Oldest decisions
        first, at most ``limit`` per call (call again to catch up); the rewards are created
        at ``now``.  Idempotent and safe to run from several processes at once: a decision
        never gets a second reward.  Returns how many rewards were inserted.
        """

    @abc.abstractmethod
    def training_events(
        self, after_reward_id: int = 0, limit: int | None = None
    ) -> list[TrainingEvent]:
        """(chosen features, reward) for rewards with ``reward_id > after_reward_id``, in order.

        At most ``limit`` of them (all with None).  Rewards become visible in ``reward_id``
        order, so a reader that polls with ``after_reward_id`` set to the largest id it has
        seen never skips one, however many processes write rewards.
        """

    @abc.abstractmethod
    def logged_events(self, log_filter: LogFilter = EVERYTHING) -> list[LoggedEvent]:
        """Every decision with a learned reward, time-ordered, for off-policy evaluation:
        each candidate's features and served probability, the chosen index, the reward.
        ``log_filter`` says which (default: every one)."""

    @abc.abstractmethod
    def logged_event_pages(
        self, log_filter: LogFilter = EVERYTHING, *, page_size: int = 5000
    ) -> Iterator[list[LoggedEvent]]:
        """:meth:`logged_events` a page of ``page_size`` at a time, read as the pages are
        consumed, so that memory holds one page, not the log.  The read is one
        transaction: every page comes from the same snapshot, whatever other processes
        write meanwhile.  Until the last page, the read holds a connection (SQLite's one:
        other threads' calls on the store wait for it)."""

    @abc.abstractmethod
    def logged_policy_runs(self, log_filter: LogFilter = EVERYTHING) -> list[LoggedRuns]:
        """The decisions :meth:`logged_events` returns for the same filter, in the same
        order, each with every policy's run (served and shadows): its probability for every
        candidate, in the order of ``LoggedEvent.features``, and its chosen index.  This is
        what evaluating the shadows off-policy needs; a shadow that failed on an event has
        a run without probabilities, and a shadow that never answered has no run."""

    @abc.abstractmethod
    def outcomes_since(self, since: datetime) -> dict[str, PolicyOutcomes]:
        """Per policy name, the rewards and feedback of the decisions made since
        ``since``: what the guardrails judge (tipgraph.guardrails)."""

    @abc.abstractmethod
    def recent_exposures(self, user_key: str, since: datetime, limit: int) -> list[ExposureItem]:
        """The tips the user was shown since ``since``, newest first, at most ``limit``:
        what eligibility rules (cooldowns, daily caps) need."""

    @abc.abstractmethod
    def user_history(self, user_key: str, limit: int) -> list[ReactionHistoryItem]:
        """The user's most recent reactions with the kind of tip they reacted to, newest first."""

    @abc.abstractmethod
    def erase_user(self, user_key: str) -> tuple[int, int]:
        """:meth:`erase_users` for one key."""

    @abc.abstractmethod
    def erase_users(self, user_keys: Sequence[str]) -> tuple[int, int]:
        """Erase each pseudonym (a user's under every configured key) in one transaction:
        delete their decisions (with candidates, every policy's scores and held feedback),
        feedback, candidate-pool entries and cached embeddings, and tombstone the keys and
        events so that no later write brings any of it back.  Returns (decisions, feedback)
        deleted.  Rewards stay, with the features they trained on, so learned statistics
        are unchanged and still rebuildable."""

    @abc.abstractmethod
    def delete_expired(self, before: datetime, *, limit: int) -> ExpiredRows:
        """Delete up to ``limit`` of the oldest decisions made before ``before``, with
        their candidates, every policy's run, feedback and held feedback, in one
        transaction.  Their rewards stay with the features they trained on (as on
        erasure), so learned statistics are unchanged and still rebuildable.  Fewer than
        ``limit`` deleted means none is left."""

    def drop_expired_partitions(self, before: datetime) -> ExpiredRows:
        """Drop every partition of decisions made wholly before ``before``, with their
        feedback, held feedback and shadow runs, keeping their rewards' features as
        :meth:`delete_expired` does.  A store without partitions (SQLite) drops nothing."""
        return ExpiredRows()

    def maintain_partitions(self, now: datetime) -> list[str]:
        """Make the partitions the coming weeks' decisions will need; returns their names.
        A store without partitions (SQLite) makes none."""
        return []

    @abc.abstractmethod
    def delete_expired_leftovers(self, before: datetime) -> ExpiredRows:
        """Delete what expired without a decision: shadow runs and feedback whose decision
        never arrived (by when they were written), and cached embeddings (by when they
        were made)."""

    # -- the candidate pool: LLM tips made ahead of need (tipgraph.generation.pool) ----------

    @abc.abstractmethod
    def read_pool_entry(self, key: PoolKey, now: datetime) -> PoolEntry | None:
        """The entry if it has tips that have not expired; None otherwise.  Reads only:
        the request path never waits for a write lock."""

    @abc.abstractmethod
    def count_pool_serves(self, serves: Mapping[tuple[PoolKey, datetime], int]) -> None:
        """Add serves to entries, each for the entry generated at that time: counts for
        tips a refill has replaced since are dropped."""

    @abc.abstractmethod
    def claim_pool_refill(self, key: PoolKey, now: datetime, stale_before: datetime) -> str | None:
        """Claim the right to (re)generate an entry: a claim token, or None when another
        refill holds a claim made at or after ``stale_before``.  The entry's tips, if any,
        stay served meanwhile."""

    @abc.abstractmethod
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
        """Store the refill's tips if ``claim`` still holds (the user was not erased, the
        claim was not taken over), resetting ``serves``, and drop the user's entries for
        other task sets; returns whether it was stored."""

    @abc.abstractmethod
    def release_pool_claim(self, key: PoolKey, claim: str) -> None:
        """Give up a claim whose refill failed, so the next miss may try again."""

    @abc.abstractmethod
    def clean_pool(self, now: datetime, *, stale_before: datetime, max_entries: int) -> int:
        """Delete expired entries, empty entries whose claim went stale, and the oldest
        entries beyond ``max_entries``; returns how many went."""

    @abc.abstractmethod
    def cached_embeddings(
        self, user_key: str, text_hashes: Sequence[str], model: str
    ) -> dict[str, list[float]]:
        """The cached embeddings by ``model`` of the user's tip texts, by text hash."""

    @abc.abstractmethod
    def cached_projections(
        self, user_key: str, text_hashes: Sequence[str], model: str
    ) -> dict[str, list[float]]:
        """The cached projections (the policies' embedding features) of the user's tip
        texts, by text hash."""

    @abc.abstractmethod
    def cache_embeddings(
        self,
        user_key: str,
        vectors: Mapping[str, tuple[Sequence[float], Sequence[float]]],
        model: str,
        now: datetime,
    ) -> None:
        """Keep (embedding, projection) pairs by text hash, never the text, until the user
        is erased."""

    @abc.abstractmethod
    def counts(self) -> StoreCounts:
        """Row counts, for status pages and tests."""

    def __enter__(self) -> DecisionStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
