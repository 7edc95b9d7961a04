"""Bus stage: the event bus's side of the graph.

In the graph when ``bus.reactions`` or ``bus.decision_events.enabled`` is on.  With
reactions, every replica pulls from the one durable consumer (:mod:`tipgraph.reactions`),
stores each reaction through the feedback path of ``POST /v1/feedback`` and teaches the
served policy (and the shadows) through their handles, as the ingress does; it reports
the consumer's lag to Serve's autoscaler (``autoscaling.signal: lag``).  With decision
events, every replica publishes the outbox (:mod:`tipgraph.decision_events`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from tipgraph.autoscaling import LAG_METRIC
from tipgraph.batching import Coalescer
from tipgraph.contracts import TipRequest
from tipgraph.decision_events import DecisionEventRelay
from tipgraph.features import UserContext
from tipgraph.feedback import FeedbackService
from tipgraph.generation import GenerationResult
from tipgraph.logs import ReplicaLogs
from tipgraph.metrics import replica_metrics
from tipgraph.reactions import ReactionConsumer
from tipgraph.scoring import PolicyScore, RewardItem
from tipgraph.settings import BUS_DEPLOYMENT, HopSettings, TipgraphSettings
from tipgraph.shadows import ShadowRunner
from tipgraph.store import open_store

logger = logging.getLogger(__name__)


class LearningHandles:
    """:class:`tipgraph.stages.Stages` for feedback alone: it teaches the served policy
    (one scoring replica now, the others at their sync) and the shadows; serving a tip is
    the ingress's job, and asking this for one is a bug.

    Concurrent feedbacks travel as one ``learn_batch`` call per deployment
    (:class:`~tipgraph.batching.Coalescer`): a remote call costs about 1 ms of CPU on each
    side, learning one reward microseconds.  Never retried: a reward that was not learned
    now is learned from the log at the replicas' next sync, one learned twice would not be.
    """

    def __init__(
        self, scoring: DeploymentHandle, shadows: DeploymentHandle | None, hop: HopSettings
    ) -> None:
        def batched(handle: DeploymentHandle) -> Coalescer[RewardItem, object]:
            return Coalescer(
                handle.learn_batch.remote,
                max_batch_size=hop.max_batch_size,
                max_inflight=hop.max_inflight_batches,
            )

        self._scoring = batched(scoring)
        self._shadows = batched(shadows) if shadows is not None else None

    async def context(self, request: TipRequest, user_key: str) -> UserContext:
        raise NotImplementedError("the bus deployment serves no tips")

    async def candidates(
        self, request: TipRequest, context: UserContext, user_key: str, event_id: str, n: int
    ) -> GenerationResult:
        raise NotImplementedError("the bus deployment serves no tips")

    async def score(self, X: np.ndarray, event_id: str) -> PolicyScore:
        raise NotImplementedError("the bus deployment serves no tips")

    def shadow_scores(
        self, X: np.ndarray, event_id: str, candidate_ids: list[str], served_candidate_id: str
    ) -> list[tuple[str, Awaitable[str | None]]]:
        raise NotImplementedError("the bus deployment serves no tips")

    async def learn(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> None:
        # One replica learns now; the others apply it from the rewards log at their sync.
        await self._scoring((reward_id, features, reward, rewarded_at))

    def learn_shadows(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> list[Awaitable[object]]:
        if self._shadows is None:
            return []
        return [self._shadows.submit((reward_id, features, reward, rewarded_at))]


@serve.deployment(name=BUS_DEPLOYMENT)
class BusReplica:
    async def __init__(  # type: ignore[misc]  # Ray awaits it
        self,
        settings: TipgraphSettings,
        scoring: DeploymentHandle,
        shadows: DeploymentHandle | None,
    ) -> None:
        self._logs = ReplicaLogs(settings.logs).start()
        metrics = replica_metrics(settings.metrics)
        self._store = open_store(settings.store)
        learners = LearningHandles(
            scoring, shadows if settings.shadows else None, settings.hops.scoring
        )
        self._shadows = ShadowRunner(learners, metrics)
        feedback = FeedbackService(settings, learners, self._store, None, self._shadows, metrics)
        self._consumer = (
            ReactionConsumer(settings.bus, feedback, metrics) if settings.bus.reactions else None
        )
        self._relay = (
            DecisionEventRelay(settings.bus, self._store, metrics)
            if settings.bus.decision_events.enabled
            else None
        )
        # Both connect in the background: a replica without NATS still starts, and says so.
        for part in (self._consumer, self._relay):
            if part is not None:
                part.start()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``autoscaling.signal: lag`` scales on (tipgraph.autoscaling)."""
        lag = self._consumer.counts.lag if self._consumer is not None else 0
        return {LAG_METRIC: float(lag or 0)}

    async def stats(self) -> dict[str, Any]:
        """This replica's counts and the consumer's lag (read now), for /readyz."""
        stats: dict[str, Any] = {}
        if self._consumer is not None:
            await self._consumer.read_lag()
            stats.update(self._consumer.counts.as_dict())
        if self._relay is not None:
            stats["decision_events_published"] = self._relay.published
        return stats

    async def __del__(self) -> None:
        for part in (self._consumer, self._relay):
            if part is not None:
                await part.close()
        await self._shadows.close()
        self._store.close()
        self._logs.close()
