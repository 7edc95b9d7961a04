"""The tip loop, independent of how the stages run.

:class:`TipService` orchestrates context -> generation -> scoring for ``/v1/tips`` and hands
the rest to pieces with one job each: :class:`~tipgraph.shadows.ShadowRunner` (shadows),
:class:`~tipgraph.feedback.FeedbackService` (feedback and held feedback),
:class:`~tipgraph.default_rewards.DefaultRewards` (the periodic default reward), and erasure.
The Serve ingress gives it :class:`~tipgraph.stages.Stages` backed by deployment handles; the
simulator, the bench baseline and tests give it in-process stages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

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
from tipgraph.decision_log import DecisionLog, DecisionLogFull
from tipgraph.default_rewards import DefaultRewards
from tipgraph.eligibility import eligible
from tipgraph.errors import InvalidRequest, Unavailable
from tipgraph.event_ids import new_event_id
from tipgraph.features import FEATURE_SPEC, candidate_matrix
from tipgraph.feedback import FeedbackService
from tipgraph.generation import GenerationResult
from tipgraph.holdout import Holdout
from tipgraph.metrics import Metrics
from tipgraph.privacy import pseudonymise
from tipgraph.rows import decision_record
from tipgraph.scoring import PolicyScore
from tipgraph.settings import TipgraphSettings
from tipgraph.shadows import ShadowRunner
from tipgraph.stages import Stages
from tipgraph.store import DecisionStore, StoreError
from tipgraph.store.records import DecisionRecord

logger = logging.getLogger(__name__)

ERASE_FLUSH_S = 2.0
"""Longest an erasure waits for this replica's writer: tombstones cover what is left."""


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
        self._secret = settings.privacy.current_secret()
        self._access_log = settings.logs.access_log
        self.shadows = ShadowRunner(stages, self.metrics)
        self.feedback_path = FeedbackService(
            settings, stages, store, log, self.shadows, self.metrics
        )
        self.default_rewards = DefaultRewards(settings.learning, store, self.metrics)
        self.holdout = Holdout(settings.experiment, FEATURE_SPEC.dim)

    def user_key(self, user_id: str) -> str:
        return pseudonymise(self._secret, user_id, namespace="user")

    async def tip(self, request: TipRequest) -> TipResponse:
        problem = check_limits(request, self.settings.limits)
        if problem:
            raise InvalidRequest(problem)
        start = time.perf_counter()
        # Any replica applies held feedback, the one that held it may be gone: start here too.
        self.feedback_path.start_applier()
        event_id = new_event_id(self._secret)
        user_key = self.user_key(request.user_id)

        t = time.perf_counter()
        context = await self.stages.context(request, user_key)
        context_ms = _ms(t)

        t = time.perf_counter()
        n = request.n_candidates or self.settings.limits.default_candidates
        generation = await self.stages.candidates(request, context, user_key, event_id, n)
        generation_ms = _ms(t)
        if not generation.candidates:
            raise InvalidRequest(
                "no candidate tip can be made: exclude_ids rules out every task and tip"
            )
        candidates, ineligible = eligible(
            generation.candidates, context.exposures, self.settings.eligibility, time.time()
        )
        if ineligible:
            generation = replace(generation, candidates=candidates)
            self.metrics.ineligible(ineligible)

        X = candidate_matrix(context, [c.view for c in candidates])
        t = time.perf_counter()
        if self.holdout.contains(user_key):
            # Decided here: the holdout policy neither learns nor needs a replica.
            result = self.holdout.score(X, event_id)
        else:
            result = await self.stages.score(X, event_id)
        scoring_ms = _ms(t)
        chosen = candidates[result.chosen]

        latency = StageLatency(
            context=context_ms, generation=generation_ms, scoring=scoring_ms, total=_ms(start)
        )
        await self._submit(
            decision_record(
                self.settings.privacy,
                self._secret,
                event_id,
                user_key,
                context,
                generation,
                X,
                result,
                latency,
                ineligible=ineligible,
            )
        )
        # Shadows start only once the served answer is in (and logged): on a busy node their
        # scoring would otherwise compete with the served policy's for the same CPUs.
        self.shadows.start(X, event_id, [c.candidate_id for c in candidates], chosen.candidate_id)
        self.metrics.decision(result.policy_name, result.policy_version, "served")
        self.metrics.stage_latency(latency)
        if self._access_log:
            self._log_served(event_id, result, generation, latency)
        return self._response(event_id, generation, result, latency)

    async def _submit(self, decision: DecisionRecord) -> None:
        try:
            await self.log.submit(decision)
        except DecisionLogFull as err:
            raise Unavailable(f"the decision cannot be logged, so it is not served: {err}") from err

    def _log_served(
        self,
        event_id: str,
        result: PolicyScore,
        generation: GenerationResult,
        latency: StageLatency,
    ) -> None:
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

    @staticmethod
    def _response(
        event_id: str, generation: GenerationResult, result: PolicyScore, latency: StageLatency
    ) -> TipResponse:
        candidates = generation.candidates
        chosen = candidates[result.chosen]
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

    async def feedback(self, request: FeedbackRequest) -> FeedbackResponse:
        return await self.feedback_path.feedback(request)

    async def erase_user(self, user_id: str) -> UserErasure:
        """Delete the user's decisions, feedback and held feedback under every configured
        key; learned statistics stay (the rewards keep their features).  The erasure is
        tombstoned in the same transaction, so rows still buffered in any replica, or
        replayed from a dead one's log, are dropped when they arrive.  This replica's
        writer gets ``ERASE_FLUSH_S`` to write first; what it still holds is reported."""
        flushed = await self.log.flush(timeout_s=ERASE_FLUSH_S)
        keys = [
            pseudonymise(secret, user_id, namespace="user")
            for secret in self.settings.privacy.all_user_key_secrets()
        ]
        try:
            decisions, feedback = await asyncio.to_thread(self.store.erase_users, keys)
        except StoreError as err:
            raise Unavailable(f"the erasure could not run, the store failed: {err}") from err
        logger.info("erased a user: %d decisions, %d feedback", decisions, feedback)
        return UserErasure(
            decisions_erased=decisions,
            feedback_erased=feedback,
            pending_writes=0 if flushed else self.log.backlog,
        )

    def apply_default_rewards(self) -> int:
        return self.default_rewards.apply()

    def report_shadow_failure(self, name: str, error: str) -> None:
        self.shadows.report_failure(name, error)

    @property
    def held_feedback(self) -> int:
        return self.feedback_path.held

    @property
    def feedback_expired(self) -> int:
        return self.feedback_path.expired

    @property
    def shadows_shed(self) -> int:
        return self.shadows.shed

    @property
    def shadow_failures(self) -> dict[str, int]:
        return self.shadows.failures

    def sample_metrics(self) -> None:
        """Set the gauges that describe this replica's writer and held feedback."""
        self.metrics.sample_decision_log(self.log)
        self.metrics.sample_feedback_held(self.held_feedback)

    async def close(self) -> None:
        """Wait for shadow work in flight, write everything still buffered, then give held
        feedback a last chance to find its decision."""
        await self.shadows.close()
        await self.log.close()
        await self.feedback_path.close()
