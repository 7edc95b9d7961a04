"""Every stage in one process, no Ray: the single-process baseline and the test double.

Implements :class:`tipgraph.stages.Stages` with the same plain-Python code the Serve
deployments wrap, so a difference between the two is the cost of the graph itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import numpy as np

from tipgraph.contracts import TipRequest
from tipgraph.decision_log import DecisionLog
from tipgraph.features import UserContext, read_user_context
from tipgraph.generation import Completer, GenerationResult
from tipgraph.generation.embedder import EmbeddingClient, embedding_model
from tipgraph.generation.litellm_client import build_candidate_source
from tipgraph.metrics import Metrics
from tipgraph.scoring import PolicyScore, PolicyService
from tipgraph.settings import TipgraphSettings
from tipgraph.shadows import ShadowErrors, ShadowSet, per_shadow
from tipgraph.store import DecisionStore


class LocalStages:
    def __init__(
        self,
        settings: TipgraphSettings,
        store: DecisionStore,
        log: DecisionLog,
        metrics: Metrics,
        *,
        completer: Completer | None = None,
        embed: EmbeddingClient | None = None,
    ) -> None:
        """``log`` and ``metrics`` are where the shadows write their runs and counts, as a
        shadow replica does with its own."""
        self._settings = settings
        self._store = store
        self._embedding_model = embedding_model(settings.generation)
        self.generator, self.refills = build_candidate_source(
            settings.generation, store, completer=completer, embed=embed, metrics=metrics
        )
        self.served = PolicyService.rebuilt(settings.policy, store)
        self.shadows = ShadowSet.build(settings.shadows, store, log, metrics)

    async def context(self, request: TipRequest, user_key: str) -> UserContext:
        return await asyncio.to_thread(
            read_user_context,
            self._store,
            request,
            user_key,
            self._settings,
            self._embedding_model,
        )

    async def candidates(
        self, request: TipRequest, context: UserContext, user_key: str, event_id: str, n: int
    ) -> GenerationResult:
        return await self.generator.candidates(request, context, user_key, event_id, n)

    async def score(self, X: np.ndarray, event_id: str) -> PolicyScore:
        return self.served.score(X, event_id)

    def shadow_scores(
        self, X: np.ndarray, event_id: str, candidate_ids: list[str], served_candidate_id: str
    ) -> list[tuple[str, Awaitable[str | None]]]:
        if not self.shadows.names:
            return []
        item = (X, event_id, candidate_ids, served_candidate_id)
        answer = asyncio.ensure_future(_first(self.shadows.score_batch([item])))
        return list(per_shadow(answer, self.shadows.names))

    async def learn(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> None:
        self.served.learn(reward_id, features, reward, rewarded_at)

    def learn_shadows(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> list[Awaitable[object]]:
        if not self.shadows.names:
            return []
        return [asyncio.to_thread(self.shadows.learn, reward_id, features, reward, rewarded_at)]

    def sync(self) -> None:
        """Apply rewards logged by others (default rewards, other processes)."""
        self.served.sync(self._store)
        self.shadows.sync(self._store)


async def _first(errors: Awaitable[list[ShadowErrors]]) -> ShadowErrors:
    (event,) = await errors
    return event
