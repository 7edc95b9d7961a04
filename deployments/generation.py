"""Generation stage: candidate tips from the tasks, an LLM, or both (tipgraph.generation)."""

from __future__ import annotations

from ray import serve

from tipgraph.batching import ItemFailure, gather_each
from tipgraph.contracts import TipRequest
from tipgraph.features import UserContext
from tipgraph.generation import GenerationResult, TipGenerator
from tipgraph.settings import TipgraphSettings


@serve.deployment(name="generation")
class CandidateGenerator:
    def __init__(self, settings: TipgraphSettings) -> None:
        # Imported here: LiteLLM loads only in the replicas that call an LLM.
        from tipgraph.generation.litellm_client import build_tip_generator

        self._generator: TipGenerator = build_tip_generator(settings.generation)

    async def generate_batch(
        self, items: list[tuple[TipRequest, UserContext, str, int]]
    ) -> list[GenerationResult | ItemFailure]:
        """Candidates for every (request, context, event_id, n); LLM calls run concurrently."""
        return await gather_each(self._generator.generate(*item) for item in items)

    def breaker_state(self) -> dict[str, object]:
        breaker = self._generator.breaker
        return {"state": breaker.state, "times_opened": breaker.times_opened}
