"""The feedback path: a reaction becomes a reward, stored once and learned at once by the
served policy (the shadows in the background).  Over HTTP, feedback whose decision cannot
be read yet (still in a writer's buffer, or the database away) is held and applied when it
can be; from the bus (:mod:`tipgraph.reactions`) it stays in the stream and comes again."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from tipgraph.contracts import FeedbackRequest, FeedbackResponse
from tipgraph.decision_log import DecisionLog, DecisionLogFull
from tipgraph.errors import FeedbackConflict, InvalidRequest, Unavailable, UnknownEvent
from tipgraph.event_ids import event_id_kind
from tipgraph.metrics import Metrics
from tipgraph.settings import TipgraphSettings
from tipgraph.shadows import ShadowRunner
from tipgraph.stages import Stages
from tipgraph.store import DecisionStore, EventErased, StoreError
from tipgraph.store.records import FeedbackRecord, StoredDecision

logger = logging.getLogger(__name__)

FLUSH_WAIT_S = 2.0
"""How long feedback waits for its decision to leave this replica's writer before it is held."""
HELD_RETRY_S = 0.5
"""How often each replica looks for held feedback whose decision has become readable."""
HELD_BATCH = 256
"""Held feedback applied per look: one query finds them all."""


@dataclass(frozen=True)
class Applied:
    """Feedback stored (``created``) or found stored already with the same reaction and
    reward (a duplicate: nothing learned twice)."""

    response: FeedbackResponse
    created: bool


class DecisionNotReadable(Exception):
    """The feedback's decision cannot be read now: not written yet (``store_answered``), or
    the store is away.  Nothing was stored; the caller retries later."""

    def __init__(self, event_id: str, *, store_answered: bool) -> None:
        why = "is not stored (yet)" if store_answered else "cannot be read: the store failed"
        super().__init__(f"the decision of event {event_id!r} {why}")
        self.store_answered = store_answered


def _response(
    record: FeedbackRecord, *, learned: bool, status: Literal["applied", "pending"] = "applied"
) -> FeedbackResponse:
    return FeedbackResponse(
        event_id=record.event_id,
        reaction=record.reaction,
        reward=record.reward,
        reacted_at=record.reacted_at,
        learned=learned,
        status=status,
    )


class FeedbackService:
    """Feedback in, rewards out.  Feedback whose decision cannot be read yet is *held*: it
    goes through the decision log (as durable as a decision) into the shared
    ``held_feedback`` table, and every replica's applier applies what has become readable,
    so held feedback survives a restart and any replica may apply it."""

    def __init__(
        self,
        settings: TipgraphSettings,
        stages: Stages,
        store: DecisionStore,
        log: DecisionLog | None,
        shadows: ShadowRunner,
        metrics: Metrics,
    ) -> None:
        """``log`` is the replica's decision writer, which holds feedback; None where
        nothing is held (the bus's reactions wait in their stream instead)."""
        self._settings = settings
        self._stages = stages
        self._store = store
        self._log = log
        self._shadows = shadows
        self._metrics = metrics
        self._keys = settings.privacy.all_user_key_secrets()
        self._applier: asyncio.Task[None] | None = None
        self._access_log = settings.logs.access_log
        self._held_stored = 0
        self._held_counted_at = 0  # the log's held_submitted when the last count began
        self.expired = 0

    @property
    def held(self) -> int:
        """Held feedback: in the store (every replica's, as of this replica's last look)
        and still in this replica's writer."""
        if self._log is None:
            return 0
        # Counted from before the last look began: a row written between the writer and
        # that count is counted twice for a moment, never zero times.
        return self._held_stored + self._log.held_submitted - self._held_counted_at

    async def feedback(self, request: FeedbackRequest) -> FeedbackResponse:
        """POST /v1/feedback: applied, or held (``status: pending``) when its decision
        cannot be read yet."""
        record = self._record(request)
        self.start_applier()
        try:
            return (await self._store_now(record)).response
        except DecisionNotReadable:
            return await self._hold(record)

    async def apply_now(
        self, request: FeedbackRequest, *, received_at: datetime | None = None
    ) -> Applied:
        """The same validation, reward and storing as :meth:`feedback`, for a caller that
        keeps the feedback itself until its decision is readable (the bus consumer): raises
        :class:`DecisionNotReadable` instead of holding it.  ``received_at``: when the
        feedback reached tipgraph, if before now (it waited in the bus's stream)."""
        return await self._store_now(self._record(request, received_at=received_at))

    async def _store_now(self, record: FeedbackRecord) -> Applied:
        """Store (and teach) ``record`` if its decision can be read now; else
        :class:`DecisionNotReadable`, for the caller to keep it and try again."""
        event_id = record.event_id
        decision, readable = await self._find_decision(event_id)
        if decision is None:
            await self._refuse_if_gone(event_id, readable)
            raise DecisionNotReadable(event_id, store_answered=readable)
        try:
            return await self._apply(record, decision)
        except EventErased as err:
            raise UnknownEvent(f"event_id {event_id!r} is not a known decision") from err
        except StoreError as err:
            # The database went away between reading the decision and storing this.
            # Trying again is safe: storing feedback is idempotent.
            logger.warning(
                "feedback for %s not stored now, the store failed: %s",
                event_id,
                err,
                extra={"event_id": event_id},
            )
            raise DecisionNotReadable(event_id, store_answered=False) from err

    def _record(
        self, request: FeedbackRequest, *, received_at: datetime | None = None
    ) -> FeedbackRecord:
        """The stored form of ``request``, or InvalidRequest/UnknownEvent: checked once,
        here, for both paths."""
        rewards = self._settings.rewards
        reward = (
            request.value if request.value is not None else rewards.reward_for(request.reaction)
        )
        if not rewards.min_reward <= reward <= rewards.max_reward:
            raise InvalidRequest(
                f"value: must be within [{rewards.min_reward}, {rewards.max_reward}], got {reward}"
            )
        if event_id_kind(request.event_id, self._keys) is None:
            raise UnknownEvent(f"event_id {request.event_id!r} is not one tipgraph issued")
        now = received_at or datetime.now(UTC)
        return FeedbackRecord(
            event_id=request.event_id,
            reaction=request.reaction,
            value=request.value,
            reward=reward,
            reacted_at=request.at or now,
            received_at=now,
        )

    async def _refuse_if_gone(self, event_id: str, readable: bool) -> None:
        """UnknownEvent when the missing decision can never appear: a legacy id was written
        long ago, and an erased one never comes back."""
        if not readable:
            return
        if event_id_kind(event_id, self._keys) == "legacy" or await self._erased(event_id):
            raise UnknownEvent(f"event_id {event_id!r} is not a known decision")

    def start_applier(self) -> None:
        """Start this replica's held-feedback applier (once; needs a running event loop)."""
        if self._applier is None or self._applier.done():
            self._applier = asyncio.get_running_loop().create_task(self._apply_held_forever())

    async def close(self) -> None:
        """Give held feedback a last look (the writer has flushed), then stop the applier."""
        if self._applier is not None:
            self._applier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._applier
        if self._log is not None:
            with contextlib.suppress(StoreError):
                await self.apply_held()

    async def _find_decision(self, event_id: str) -> tuple[StoredDecision | None, bool]:
        """The logged decision, and whether the store could be read at all: a decision not
        readable (not written yet, or the database away) holds its feedback."""
        try:
            decision = await asyncio.to_thread(self._store.get_decision, event_id)
            if decision is None and self._log is not None and self._log.is_pending(event_id):
                await self._log.flush(timeout_s=FLUSH_WAIT_S)
                decision = await asyncio.to_thread(self._store.get_decision, event_id)
        except StoreError as err:
            logger.warning(
                "decision %s not readable now (%s); holding its feedback",
                event_id,
                err,
                extra={"event_id": event_id},
            )
            return None, False
        return decision, True

    async def _erased(self, event_id: str) -> bool:
        try:
            return await asyncio.to_thread(self._store.is_erased, event_id)
        except StoreError:
            return False

    async def _hold(self, record: FeedbackRecord) -> FeedbackResponse:
        if self._log is None:
            raise Unavailable("feedback cannot be held here")
        if self.held >= self._settings.learning.max_held_feedback:
            raise Unavailable(f"{self.held} feedback items are waiting for their decisions; retry")
        try:
            await self._log.submit_held_feedback(record)
        except DecisionLogFull as err:
            raise Unavailable(f"feedback cannot be kept now: {err}") from err
        if self._access_log:
            logger.info(
                "feedback held until its decision can be read",
                extra={"event_id": record.event_id, "reaction": record.reaction},
            )
        return _response(record, learned=False, status="pending")

    async def _apply_held_forever(self) -> None:
        while True:
            await asyncio.sleep(HELD_RETRY_S)
            try:
                await self.apply_held()
            except StoreError as err:
                logger.warning("held feedback waits for the database: %s", err)
            except Exception:
                logger.exception("held feedback applier failed; trying again")

    async def apply_held(self) -> int:
        """Apply held feedback whose decision is readable now (one query for the batch),
        expire what waited longer than the reward wait, and count what is left.  Several
        replicas may do this at once: storing feedback is idempotent, the first wins."""
        ready = await asyncio.to_thread(self._store.held_feedback_ready, HELD_BATCH)
        for record, decision in ready:
            try:
                await self._apply(record, decision)
            except (FeedbackConflict, EventErased) as err:
                logger.warning(
                    "held feedback dropped: %s", err, extra={"event_id": record.event_id}
                )
        if ready:
            applied = [record.event_id for record, _ in ready]
            await asyncio.to_thread(self._store.delete_held_feedback, applied)
        cutoff = datetime.now(UTC) - timedelta(seconds=self._settings.learning.reward_wait_s)
        expired = await asyncio.to_thread(self._store.expire_held_feedback, cutoff)
        if expired:
            self.expired += expired
            logger.warning(
                "%d held feedback items expired: their decisions never appeared", expired
            )
        counted_at = self._log.held_submitted if self._log is not None else 0
        self._held_stored = await asyncio.to_thread(self._store.count_held_feedback)
        self._held_counted_at = counted_at
        return len(ready)

    async def _apply(self, record: FeedbackRecord, decision: StoredDecision) -> Applied:
        outcome = await asyncio.to_thread(
            functools.partial(
                self._store.record_feedback,
                record,
                learn_within_s=self._settings.learning.reward_wait_s,
            )
        )
        stored = outcome.record
        if not outcome.created and (stored.reaction, stored.reward) != (
            record.reaction,
            record.reward,
        ):
            raise FeedbackConflict(
                f"event {record.event_id!r} already has feedback "
                f"{stored.reaction!r} (reward {stored.reward}); feedback is final"
            )
        if outcome.created:
            self._metrics.reward(
                decision.policy_name, decision.policy_version, record.reaction, record.reward
            )
            if self._access_log:
                logger.info(
                    "feedback recorded",
                    extra={
                        "event_id": record.event_id,
                        "reaction": record.reaction,
                        "learned": outcome.learned,
                    },
                )
        if outcome.created and outcome.reward_id is not None:
            features = decision.chosen_features
            # The reward row's created_at is the stored feedback's arrival: a replica that
            # syncs it from the log weighs it by the same time.
            rewarded_at = stored.received_at.timestamp()
            try:
                await self._stages.learn(outcome.reward_id, features, record.reward, rewarded_at)
            except Exception:
                # The reward is logged; the replicas pick it up at their next sync.
                logger.exception(
                    "served policy did not learn event %s now",
                    record.event_id,
                    extra={"event_id": record.event_id},
                )
            self._shadows.learn(outcome.reward_id, features, record.reward, rewarded_at)
        return Applied(_response(stored, learned=outcome.learned), created=outcome.created)
