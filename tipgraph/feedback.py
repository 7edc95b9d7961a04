"""The feedback path: a reaction becomes a reward, stored once and learned at once by the
served policy (the shadows in the background).  Feedback whose decision cannot be read yet
(still in a writer's buffer, or the database away) is held and applied when it can be."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from tipgraph.contracts import FeedbackRequest, FeedbackResponse
from tipgraph.decision_log import DecisionLog
from tipgraph.errors import FeedbackConflict, InvalidRequest, Unavailable, UnknownEvent
from tipgraph.metrics import Metrics
from tipgraph.settings import TipgraphSettings
from tipgraph.shadows import ShadowRunner
from tipgraph.stages import Stages
from tipgraph.store import DecisionStore, StoreError
from tipgraph.store.records import FeedbackRecord, StoredDecision

logger = logging.getLogger(__name__)

EVENT_ID = re.compile(r"[0-9a-f]{32}")
"""What ``tip`` issues (uuid4 hex): anything else cannot be a decision, now or later."""
FLUSH_WAIT_S = 2.0
"""How long feedback waits for its decision to leave this replica's writer before it is held."""
HELD_RETRY_S = 0.5
"""How often held feedback looks for its decision again."""


@dataclass
class HeldFeedback:
    """Feedback accepted before its decision row could be read (not yet written, or the
    database unreachable); applied by the retry loop once the row is there."""

    record: FeedbackRecord
    held_at: float


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
    def __init__(
        self,
        settings: TipgraphSettings,
        stages: Stages,
        store: DecisionStore,
        log: DecisionLog,
        shadows: ShadowRunner,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._stages = stages
        self._store = store
        self._log = log
        self._shadows = shadows
        self._metrics = metrics
        self._held: dict[str, HeldFeedback] = {}
        self._held_task: asyncio.Future[None] | None = None
        self._access_log = settings.logs.access_log
        self.expired = 0

    @property
    def held(self) -> int:
        return len(self._held)

    async def feedback(self, request: FeedbackRequest) -> FeedbackResponse:
        rewards = self._settings.rewards
        reward = (
            request.value if request.value is not None else rewards.reward_for(request.reaction)
        )
        if not rewards.min_reward <= reward <= rewards.max_reward:
            raise InvalidRequest(
                f"value: must be within [{rewards.min_reward}, {rewards.max_reward}], got {reward}"
            )
        if not EVENT_ID.fullmatch(request.event_id):
            raise UnknownEvent(
                f"event_id {request.event_id!r} is not a known decision: tipgraph issues "
                "32 lowercase hex characters"
            )
        now = datetime.now(UTC)
        record = FeedbackRecord(
            event_id=request.event_id,
            reaction=request.reaction,
            value=request.value,
            reward=reward,
            reacted_at=request.at or now,
            received_at=now,
        )
        decision = await self._find_decision(request.event_id)
        if decision is None:
            return self._hold(record)
        try:
            return await self._apply(record, decision)
        except StoreError as err:
            # The database went away between reading the decision and storing this: hold
            # it. Retrying is safe, storing feedback is idempotent.
            logger.warning(
                "feedback for %s held, the store failed: %s",
                record.event_id,
                err,
                extra={"event_id": record.event_id},
            )
            return self._hold(record)

    def held_event_ids(self) -> Iterator[str]:
        return iter(list(self._held))

    def drop_held(self, event_id: str) -> None:
        self._held.pop(event_id, None)

    async def close(self) -> None:
        """Give held feedback a last chance to find its decision (the writer has flushed)."""
        if self._held:
            await self._apply_held(expire_after_s=float("inf"))
        if self._held:
            logger.error("shutting down with %d feedback items still held", len(self._held))
        if self._held_task is not None:
            self._held_task.cancel()

    async def _find_decision(self, event_id: str) -> StoredDecision | None:
        """The logged decision, or None when it is not readable yet (not written, or the
        database is unreachable): such feedback is held, never rejected."""
        try:
            decision = await asyncio.to_thread(self._store.get_decision, event_id)
            if decision is None and self._log.is_pending(event_id):
                await asyncio.wait_for(self._log.flush(), timeout=FLUSH_WAIT_S)
                decision = await asyncio.to_thread(self._store.get_decision, event_id)
        except (StoreError, TimeoutError) as err:
            logger.warning(
                "decision %s not readable now (%s); holding its feedback",
                event_id,
                err,
                extra={"event_id": event_id},
            )
            return None
        return decision

    def _hold(self, record: FeedbackRecord) -> FeedbackResponse:
        held = self._held.get(record.event_id)
        if held is None:
            if len(self._held) >= self._settings.store.max_buffered_rows:
                raise Unavailable(
                    f"{len(self._held)} feedback items are waiting for their decisions; retry"
                )
            held = self._held[record.event_id] = HeldFeedback(record, time.monotonic())
            if self._access_log:
                logger.info(
                    "feedback held until its decision can be read",
                    extra={"event_id": record.event_id, "reaction": record.reaction},
                )
            if self._held_task is None or self._held_task.done():
                self._held_task = asyncio.ensure_future(self._retry_held())
        elif (held.record.reaction, held.record.reward) != (record.reaction, record.reward):
            raise FeedbackConflict(
                f"event {record.event_id!r} already has feedback {held.record.reaction!r} "
                f"(reward {held.record.reward}) waiting; feedback is final"
            )
        return _response(held.record, learned=False, status="pending")

    async def _retry_held(self) -> None:
        """Apply held feedback as its decisions become readable; drop what can never be
        learned (older than the reward wait, so its decision will not come)."""
        wait_s = self._settings.learning.reward_wait_s
        while self._held:
            await asyncio.sleep(HELD_RETRY_S)
            await self._apply_held(expire_after_s=wait_s)

    async def _apply_held(self, *, expire_after_s: float) -> None:
        for event_id, held in list(self._held.items()):
            try:
                decision = await asyncio.to_thread(self._store.get_decision, event_id)
                if decision is not None:
                    await self._apply(held.record, decision)
                elif time.monotonic() - held.held_at <= expire_after_s:
                    continue  # keep waiting for the decision
                else:
                    self.expired += 1
                    logger.warning(
                        "feedback for %s expired: its decision never appeared",
                        event_id,
                        extra={"event_id": event_id},
                    )
            except StoreError as err:
                logger.warning("held feedback waits for the database: %s", err)
                return
            except FeedbackConflict as err:
                # Another replica stored different feedback first: that one is final.
                logger.warning(
                    "held feedback dropped: %s", err.message, extra={"event_id": event_id}
                )
            self._held.pop(event_id, None)

    async def _apply(self, record: FeedbackRecord, decision: StoredDecision) -> FeedbackResponse:
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
            try:
                await self._stages.learn(outcome.reward_id, features, record.reward)
            except Exception:
                # The reward is logged; the replicas pick it up at their next sync.
                logger.exception(
                    "served policy did not learn event %s now",
                    record.event_id,
                    extra={"event_id": record.event_id},
                )
            self._shadows.learn(outcome.reward_id, features, record.reward)
        return _response(stored, learned=outcome.learned)
