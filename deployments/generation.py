"""Generation stage: candidate tips from the tasks, an LLM, or both (tipgraph.generation)."""

from __future__ import annotations

from ray import serve

from tipgraph.autoscaling import ItemLoad
from tipgraph.batching import ItemFailure, gather_each
from tipgraph.contracts import TipRequest
from tipgraph.features import UserContext
from tipgraph.generation import GenerationResult, TipGenerator
from tipgraph.generation.litellm_client import build_tip_generator
from tipgraph.logs import ReplicaLogs
from tipgraph.metrics import replica_metrics
from tipgraph.periodic import Periodic
from tipgraph.settings import TipgraphSettings


@serve.deployment(name="generation")
class CandidateGenerator:
    def __init__(self, settings: TipgraphSettings) -> None:
        # LiteLLM itself loads only when build_tip_generator needs a client (litellm_client).
        self._logs = ReplicaLogs(settings.logs).start()
        metrics = replica_metrics(settings.metrics)
        self._generator: TipGenerator = build_tip_generator(settings.generation, metrics=metrics)
        self._load = ItemLoad()
        # Sampled, not pushed on change: open turns half-open with time, not with a call.
        self._gauges = Periodic(
            settings.metrics.sample_interval_s,
            lambda: metrics.sample_breaker(self._generator.breaker),
            name="metrics",
        ).start()

    async def generate_batch(
        self, items: list[tuple[TipRequest, UserContext, str, int]]
    ) -> list[GenerationResult | ItemFailure]:
        """Candidates for every (request, context, event_id, n); LLM calls run concurrently."""
        with self._load.holding(len(items)):
            return await gather_each(self._generator.generate(*item) for item in items)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``autoscaling.signal: items`` scales on (tipgraph.autoscaling)."""
        return self._load.report()

    def breaker_state(self) -> dict[str, object]:
        breaker = self._generator.breaker
        return {"state": breaker.state, "times_opened": breaker.times_opened}

    def __del__(self) -> None:
        self._gauges.stop()
        self._logs.close()
