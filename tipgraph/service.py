"""The tip loop, independent of how the stages run.

:class:`TipService` orchestrates context -> generation -> scoring (+ shadows) and the
feedback path.  The Serve ingress gives it a :class:`Stages` implementation backed by
deployment handles; a single-process baseline or a test can give it in-process stages.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, Protocol

import numpy as np

from tipgraph.contracts import (
    FeedbackRequest,
    FeedbackResponse,
    PolicyInfo,
    RankedCandidate,
    StageLatency,
    Tip,
    TipRequest,
    TipResponse,
    UserErasure,
    check_limits,
)
from tipgraph.decision_log import DecisionLog
from tipgraph.features import UserContext, candidate_matrix
from tipgraph.generation import GenerationResult
from tipgraph.metrics import Metrics
from tipgraph.privacy import pseudonymise
from tipgraph.scoring import PolicyScore
from tipgraph.settings import TipgraphSettings
from tipgraph.store import DecisionStore, StoreError
from tipgraph.store.records import (
    CandidateRecord,
    DecisionRecord,
    FeedbackRecord,
    PolicyRole,
    PolicyScoresRecord,
    StoredDecision,
)

logger = logging.getLogger(__name__)

# Requests with shadow work in flight beyond this shed theirs (skipped and counted), never
# queued behind.
MAX_SHADOW_INFLIGHT = 512
SHADOW_TIMEOUT_S = 30.0
SHADOW_LOG_EVERY_S = 10.0


class TipgraphError(Exception):
    """An error with an HTTP status and a message meant for the caller."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(TipgraphError):
    status_code = 422


class UnknownEvent(TipgraphError):
    status_code = 404


class FeedbackConflict(TipgraphError):
    status_code = 409


class Unavailable(TipgraphError):
    status_code = 503


EVENT_ID = re.compile(r"[0-9a-f]{32}")
"""What ``tip`` issues (uuid4 hex): anything else cannot be a decision, now or later."""
FLUSH_WAIT_S = 2.0
"""How long feedback waits for its decision to leave this replica's writer before it is held."""
CLOSE_MARGIN_S = 1.0
"""How much longer than a shadow logger's own timeout ``close`` waits for it."""
HELD_RETRY_S = 0.5
"""How often held feedback looks for its decision again."""


@dataclass
class HeldFeedback:
    """Feedback accepted before its decision row could be read (not yet written, or the
    database unreachable); applied by the retry loop once the row is there."""

    record: FeedbackRecord
    held_at: float


class Stages(Protocol):
    async def context(self, request: TipRequest, user_key: str) -> UserContext: ...

    async def candidates(
        self, request: TipRequest, context: UserContext, event_id: str, n: int
    ) -> GenerationResult:
        """Candidates within the generation timeout, from task tips if the LLM fails."""
        ...

    async def score(self, X: np.ndarray, event_id: str) -> PolicyScore: ...

    def shadow_scores(
        self, X: np.ndarray, event_id: str, candidate_ids: list[str], served_candidate_id: str
    ) -> list[tuple[str, Awaitable[PolicyScore]]]:
        """Start every shadow on the candidates; the caller must not wait for them.

        The caller logs and counts each returned answer.  Stages whose shadows log their
        own runs (the Serve graph's) return nothing: the shadow compares its pick with
        ``served_candidate_id`` itself.
        """
        ...

    async def learn(self, reward_id: int, features: list[float], reward: float) -> None:
        """Teach one replica of the served policy now; the others catch up by syncing."""
        ...

    def learn_shadows(
        self, reward_id: int, features: list[float], reward: float
    ) -> list[Awaitable[object]]: ...


def describe_error(err: BaseException) -> str:
    """One line naming the root error; a remote error's traceback stays in the logs.

    A replica's exception reaches the caller as a RayTaskError whose text is the remote
    traceback; its last line is the original ``Type: message``.
    """
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1].strip()[:500]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


def _feedback_response(
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


def policy_run(
    result: PolicyScore, role: PolicyRole, candidate_ids: Sequence[str], latency_ms: float
) -> PolicyScoresRecord:
    """The log row of one policy's answer for one event."""
    return PolicyScoresRecord(
        policy_name=result.policy_name,
        policy_version=result.policy_version,
        role=role,
        scores=result.scores,
        probabilities=result.probabilities,
        chosen_candidate_id=candidate_ids[result.chosen],
        chosen_probability=result.chosen_probability,
        latency_ms=latency_ms,
    )


def failed_run(policy_name: str, error: str, latency_ms: float) -> PolicyScoresRecord:
    """The log row of a shadow that failed on one event: the error, no scores."""
    return PolicyScoresRecord(
        policy_name=policy_name,
        policy_version="",
        role="shadow",
        scores=[],
        probabilities=[],
        chosen_candidate_id=None,
        chosen_probability=None,
        latency_ms=latency_ms,
        error=error,
    )


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class TipService:
    def __init__(
        self,
        settings: TipgraphSettings,
        stages: Stages,
        store: DecisionStore,
        log: DecisionLog,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.stages = stages
        self.store = store
        self.log = log
        self.metrics = metrics if metrics is not None else Metrics()
        self._secret = settings.privacy.user_key_secret.get_secret_value()
        self._background: set[asyncio.Task[None]] = set()
        self.shadows_shed = 0
        self.shadow_failures: dict[str, int] = {}
        self._shadow_logged_at: dict[str, float] = {}
        self._held: dict[str, HeldFeedback] = {}
        self._held_task: asyncio.Future[None] | None = None
        self.feedback_expired = 0
        self._access_log = settings.logs.access_log

    def user_key(self, user_id: str) -> str:
        return pseudonymise(self._secret, user_id, namespace="user")

    async def tip(self, request: TipRequest) -> TipResponse:
        problem = check_limits(request, self.settings.limits)
        if problem:
            raise InvalidRequest(problem)
        start = time.perf_counter()
        event_id = uuid.uuid4().hex
        user_key = self.user_key(request.user_id)

        t = time.perf_counter()
        context = await self.stages.context(request, user_key)
        context_ms = _ms(t)

        t = time.perf_counter()
        n = request.n_candidates or self.settings.limits.default_candidates
        generation = await self.stages.candidates(request, context, event_id, n)
        candidates = generation.candidates
        generation_ms = _ms(t)
        if not candidates:
            raise InvalidRequest(
                "no candidate tip can be made: exclude_ids rules out every task and tip"
            )

        X = candidate_matrix(context, [c.view for c in candidates])
        t = time.perf_counter()
        result = await self.stages.score(X, event_id)
        scoring_ms = _ms(t)
        chosen = candidates[result.chosen]
        # Shadows start only once the served answer is in: on a busy node their scoring
        # would otherwise compete with the served policy's for the same CPUs.
        self._start_shadows(X, event_id, [c.candidate_id for c in candidates], chosen.candidate_id)

        latency = StageLatency(
            context=context_ms, generation=generation_ms, scoring=scoring_ms, total=_ms(start)
        )
        self.log.submit(
            self._decision_record(event_id, user_key, context, generation, X, result, latency)
        )
        self.metrics.decision(result.policy_name, result.policy_version, "served")
        self.metrics.stage_latency(latency)
        if self._access_log:
            # The line that ties Serve's request_id to the event; ids and numbers only.
            logger.info(
                "tip served",
                extra={
                    "event_id": event_id,
                    "policy": result.policy_name,
                    "policy_version": result.policy_version,
                    "generation_source": generation.source,
                    "latency_ms": round(latency.total, 2),
                },
            )
        return TipResponse(
            event_id=event_id,
            tip=Tip(
                candidate_id=chosen.candidate_id,
                content=chosen.content,
                kind=chosen.kind,
                source=chosen.source,
                task_id=chosen.task_id,
                model=chosen.model,
                prompt_version=chosen.prompt_version,
            ),
            probability=result.chosen_probability,
            policy=PolicyInfo(name=result.policy_name, version=result.policy_version),
            ranking=sorted(
                (
                    RankedCandidate(candidate_id=c.candidate_id, score=s, probability=p)
                    for c, s, p in zip(candidates, result.scores, result.probabilities, strict=True)
                ),
                key=lambda r: (-r.probability, -r.score),
            ),
            latency_ms=latency,
        )

    def _start_shadows(
        self, X: np.ndarray, event_id: str, candidate_ids: list[str], served_candidate_id: str
    ) -> None:
        if len(self._background) >= MAX_SHADOW_INFLIGHT:
            self.shadows_shed += 1
            logger.warning(
                "shadow scoring shed for event %s: %d in flight",
                event_id,
                len(self._background),
                extra={"event_id": event_id},
            )
            return
        # Every shadow starts now; one task per request (not per shadow) logs them all.
        pending = [
            (name, asyncio.ensure_future(call))
            for name, call in self.stages.shadow_scores(
                X, event_id, candidate_ids, served_candidate_id
            )
        ]
        if pending:
            self._spawn(self._log_shadows(pending, event_id, candidate_ids, served_candidate_id))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _log_shadows(
        self,
        pending: Sequence[tuple[str, asyncio.Future[PolicyScore]]],
        event_id: str,
        candidate_ids: list[str],
        served_candidate_id: str,
    ) -> None:
        start = time.perf_counter()
        finished_ms: dict[str, float] = {}

        def stamp(name: str) -> Callable[[object], None]:
            # Round trip as the ingress saw it, like the served policy's row.
            return lambda _: finished_ms.__setitem__(name, _ms(start))

        for name, future in pending:
            future.add_done_callback(stamp(name))
        await asyncio.wait([future for _, future in pending], timeout=SHADOW_TIMEOUT_S)
        runs = []
        for name, future in pending:
            latency_ms = finished_ms.get(name, _ms(start))
            if not future.done():
                future.cancel()
                error = f"TimeoutError: no answer within {SHADOW_TIMEOUT_S:g} s"
            elif future.cancelled():
                error = "CancelledError: the shadow call was cancelled"
            elif (err := future.exception()) is not None:
                error = describe_error(err)  # a shadow may fail in any way; only logged
            else:
                run = policy_run(future.result(), "shadow", candidate_ids, latency_ms)
                self.metrics.shadow_run(run, served_candidate_id)
                runs.append(run)
                continue
            self.report_shadow_failure(name, error)
            runs.append(failed_run(name, error, latency_ms))
        self.log.submit_policy_scores(event_id, runs, candidate_ids)

    def report_shadow_failure(self, name: str, error: str) -> None:
        """Count every failure; log one line per shadow per SHADOW_LOG_EVERY_S, so a broken
        shadow costs the serving event loop a counter increment, not a log write each time."""
        self.shadow_failures[name] = self.shadow_failures.get(name, 0) + 1
        self.metrics.shadow_failure(name)
        now = time.monotonic()
        if now - self._shadow_logged_at.get(name, float("-inf")) >= SHADOW_LOG_EVERY_S:
            self._shadow_logged_at[name] = now
            logger.warning(
                "shadow %s failing (%d failures so far): %s",
                name,
                self.shadow_failures[name],
                error,
            )

    def _decision_record(
        self,
        event_id: str,
        user_key: str,
        context: UserContext,
        generation: GenerationResult,
        X: np.ndarray,
        result: PolicyScore,
        latency: StageLatency,
    ) -> DecisionRecord:
        candidates = generation.candidates
        chosen = candidates[result.chosen]
        records = [
            CandidateRecord(
                candidate_id=c.candidate_id,
                position=i,
                kind=c.kind,
                source=c.source,
                # Task-mode tips quote the user's task: only the tip actually shown is kept,
                # unless privacy.store_candidate_text says otherwise.
                content=c.content
                if i == result.chosen or self.settings.privacy.store_candidate_text
                else "",
                task_ref=pseudonymise(self._secret, c.task_id, namespace=user_key)
                if c.task_id
                else None,
                model=c.model,
                prompt_version=c.prompt_version,
                features=X[i].tolist(),
            )
            for i, c in enumerate(candidates)
        ]
        return DecisionRecord(
            event_id=event_id,
            user_key=user_key,
            created_at=datetime.now(UTC),
            policy_name=result.policy_name,
            policy_version=result.policy_version,
            feature_version=context.feature_version,
            prompt_version=generation.prompt_version,
            generation_source=generation.source,
            generation_reason=generation.reason,
            llm_model=generation.model,
            chosen_candidate_id=chosen.candidate_id,
            chosen_kind=chosen.kind,
            chosen_probability=result.chosen_probability,
            latency_ms=latency.model_dump(),
            context_features=list(context.vector),
            candidates=records,
            served=policy_run(
                result, "served", [c.candidate_id for c in candidates], latency.scoring
            ),
        )

    async def feedback(self, request: FeedbackRequest) -> FeedbackResponse:
        rewards = self.settings.rewards
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

    async def _find_decision(self, event_id: str) -> StoredDecision | None:
        """The logged decision, or None when it is not readable yet (not written, or the
        database is unreachable): such feedback is held, never rejected."""
        try:
            decision = await asyncio.to_thread(self.store.get_decision, event_id)
            if decision is None and self.log.is_pending(event_id):
                await asyncio.wait_for(self.log.flush(), timeout=FLUSH_WAIT_S)
                decision = await asyncio.to_thread(self.store.get_decision, event_id)
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
            if len(self._held) >= self.settings.store.max_buffered_rows:
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
        return _feedback_response(held.record, learned=False, status="pending")

    @property
    def held_feedback(self) -> int:
        return len(self._held)

    def sample_metrics(self) -> None:
        """Set the gauges that describe this replica's writer and held feedback."""
        self.metrics.sample_decision_log(self.log)
        self.metrics.sample_feedback_held(self.held_feedback)

    async def _retry_held(self) -> None:
        """Apply held feedback as its decisions become readable; drop what can never be
        learned (older than the reward wait, so its decision will not come)."""
        wait_s = self.settings.learning.reward_wait_s
        while self._held:
            await asyncio.sleep(HELD_RETRY_S)
            await self._apply_held(expire_after_s=wait_s)

    async def _apply_held(self, *, expire_after_s: float) -> None:
        for event_id, held in list(self._held.items()):
            try:
                decision = await asyncio.to_thread(self.store.get_decision, event_id)
                if decision is not None:
                    await self._apply(held.record, decision)
                elif time.monotonic() - held.held_at <= expire_after_s:
                    continue  # keep waiting for the decision
                else:
                    self.feedback_expired += 1
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
                self.store.record_feedback,
                record,
                learn_within_s=self.settings.learning.reward_wait_s,
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
            self.metrics.reward(
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
                await self.stages.learn(outcome.reward_id, features, record.reward)
            except Exception:
                # The reward is logged; the replicas pick it up at their next sync.
                logger.exception(
                    "served policy did not learn event %s now",
                    record.event_id,
                    extra={"event_id": record.event_id},
                )
            for pending in self.stages.learn_shadows(outcome.reward_id, features, record.reward):
                self._spawn(self._quietly(pending, "shadow learn"))
        return _feedback_response(stored, learned=outcome.learned)

    async def erase_user(self, user_id: str) -> UserErasure:
        """Delete the user's decisions and feedback; learned statistics stay (the rewards
        keep their features).  Buffered decisions are written first, so none of this
        user's lands after the erasure from this replica."""
        await self.log.flush()
        user_key = self.user_key(user_id)
        for event_id in list(self._held):
            decision = await asyncio.to_thread(self.store.get_decision, event_id)
            if decision is not None and decision.user_key == user_key:
                self._held.pop(event_id, None)
        decisions, feedback = await asyncio.to_thread(self.store.erase_user, user_key)
        logger.info("erased a user: %d decisions, %d feedback", decisions, feedback)
        return UserErasure(decisions_erased=decisions, feedback_erased=feedback)

    def apply_default_rewards(self) -> int:
        """Log the default reward for decisions whose feedback wait ran out; policies learn
        it at their next sync.  Safe to run from every ingress replica at once."""
        learning = self.settings.learning
        if learning.default_reward is None:
            return 0
        now = datetime.now(UTC)
        applied = self.store.apply_default_rewards(
            older_than=now - timedelta(seconds=learning.reward_wait_s),
            reward=learning.default_reward,
            now=now,
        )
        if applied:
            logger.info("applied the default reward to %d decisions", applied)
            self.metrics.default_rewards(applied)
        return applied

    @staticmethod
    async def _quietly(pending: Awaitable[object], what: str) -> None:
        try:
            await asyncio.wait_for(pending, timeout=SHADOW_TIMEOUT_S)
        except Exception as err:
            logger.warning("%s failed: %s", what, err)

    async def close(self) -> None:
        """Wait for shadow work in flight, write everything still buffered, then give held
        feedback a last chance to find its decision."""
        if self._background:
            # A shadow logger gives up on its shadows after SHADOW_TIMEOUT_S and then writes
            # their rows: waiting only as long raced it on a busy machine and lost the rows.
            await asyncio.wait(set(self._background), timeout=SHADOW_TIMEOUT_S + CLOSE_MARGIN_S)
        await self.log.close()
        if self._held:
            await self._apply_held(expire_after_s=float("inf"))
        if self._held:
            logger.error("shutting down with %d feedback items still held", len(self._held))
        if self._held_task is not None:
            self._held_task.cancel()
