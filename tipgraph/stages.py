"""What the tip loop needs from the stages, however they run: in this process
(:class:`tipgraph.local.LocalStages`) or as Serve deployments behind handles
(``deployments.ingress.HandleStages``)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

import numpy as np

from tipgraph.contracts import TipRequest
from tipgraph.features import UserContext
from tipgraph.generation import GenerationResult
from tipgraph.scoring import PolicyScore


class Stages(Protocol):
    async def context(self, request: TipRequest, user_key: str) -> UserContext: ...

    async def candidates(
        self, request: TipRequest, context: UserContext, user_key: str, event_id: str, n: int
    ) -> GenerationResult:
        """Candidates at once: LLM tips from the pool (or inline, within the generation
        timeout), task tips when there are none."""
        ...

    async def score(self, X: np.ndarray, event_id: str) -> PolicyScore: ...

    def shadow_scores(
        self, X: np.ndarray, event_id: str, candidate_ids: list[str], served_candidate_id: str
    ) -> list[tuple[str, Awaitable[str | None]]]:
        """Hand the event to every shadow, which scores it, logs its run and compares its
        pick with ``served_candidate_id`` itself (:class:`~tipgraph.shadows.ShadowScorer`).

        Each awaitable gives that shadow's error (None when it scored), or raises
        :class:`~tipgraph.shadows.ShadowShed` when the shadow skipped the event.  The caller
        only counts them, and never makes a request wait for them.
        """
        ...

    async def learn(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> None:
        """Teach one replica of the served policy now; the others catch up by syncing.
        ``rewarded_at`` is the reward's logged time (Unix seconds)."""
        ...

    def learn_shadows(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> list[Awaitable[object]]: ...
