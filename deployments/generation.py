"""Generation stage: candidate tips from the tasks, an LLM, or both (tipgraph.generation).

With ``generation.serve_from: pool`` the request path reads the candidate pool and sends
the refills it finds due to the pool deployment (deployments/pool.py) without waiting for
them: this replica calls no model and loads no LLM client.
"""

from __future__ import annotations

import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from tipgraph.autoscaling import ItemLoad
from tipgraph.batching import ItemFailure, gather_each
from tipgraph.generation import CandidateSource, GenerationItem, GenerationResult, TipGenerator
from tipgraph.generation.litellm_client import build_candidate_source, warm_up
from tipgraph.generation.pool import PooledGenerator, RefillJob, RefillSender
from tipgraph.logs import ReplicaLogs
from tipgraph.metrics import replica_metrics
from tipgraph.periodic import Periodic
from tipgraph.settings import TipgraphSettings
from tipgraph.store import DecisionStore, open_store

logger = logging.getLogger(__name__)

SERVES_FLUSH_S = 1.0
"""How often a replica writes the pool serves it counted (refreshes lag this much)."""
REFILL_CALLS_IN_FLIGHT = 32
"""Calls to the pool deployment out at once per replica; beyond, refills wait for a later
request (tipgraph.generation.pool.RefillSender)."""


@serve.deployment(name="generation")
class CandidateGenerator:
    async def __init__(  # type: ignore[misc]  # Ray constructs replicas with async __init__
        self, settings: TipgraphSettings, pool: DeploymentHandle | None = None
    ) -> None:
        """``pool``: the pool deployment, in the graph when generation serves from it."""
        # LiteLLM itself loads only when the configuration asks for an LLM (litellm_client).
        self._logs = ReplicaLogs(settings.logs).start()
        metrics = replica_metrics(settings.metrics)
        generation = settings.generation
        self._store: DecisionStore | None = None
        refills = None
        if generation.pooled:
            if pool is None:
                raise ValueError("generation.serve_from: pool needs the pool deployment")
            self._store = open_store(settings.store)

            async def send(jobs: list[RefillJob]) -> object:
                return await pool.submit.remote(jobs)

            refills = RefillSender(send, max_in_flight=REFILL_CALLS_IN_FLIGHT, metrics=metrics)
        self._source: CandidateSource
        self._source, _ = build_candidate_source(
            generation, self._store, refills=refills, metrics=metrics
        )
        if isinstance(self._source, TipGenerator):  # inline: the LLM is on the request path
            await warm_up(self._source.completer, generation, refills=False)
        self._load = ItemLoad()
        breaker = self._source.breaker
        # Sampled, not pushed on change: open turns half-open with time, not with a call.
        self._gauges = (
            Periodic(
                settings.metrics.sample_interval_s,
                lambda: metrics.sample_breaker(breaker),
                name="metrics",
            ).start()
            if breaker is not None
            else None
        )
        source = self._source
        self._serves = (
            Periodic(SERVES_FLUSH_S, source.flush_serves, name="pool-serves").start()
            if isinstance(source, PooledGenerator)
            else None
        )

    async def generate_batch(
        self, items: list[GenerationItem]
    ) -> list[GenerationResult | ItemFailure]:
        """Candidates for every (request, context, user_key, event_id, n), concurrently."""
        with self._load.holding(len(items)):
            if isinstance(self._source, PooledGenerator):
                try:
                    return list(await self._source.candidates_many(items))
                except Exception:
                    logger.exception("candidate-pool batch failed; serving it item by item")
            return await gather_each(self._source.candidates(*item) for item in items)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``autoscaling.signal: items`` scales on (tipgraph.autoscaling)."""
        return self._load.report()

    def breaker_state(self) -> dict[str, object]:
        """The tip-generator's breaker; serving from the pool, the pool replicas hold it."""
        breaker = self._source.breaker
        if breaker is None:
            return {"state": "none", "times_opened": 0}
        return {"state": breaker.state, "times_opened": breaker.times_opened}

    def __del__(self) -> None:
        if self._gauges is not None:
            self._gauges.stop()
        if self._serves is not None:
            self._serves.stop()
        if self._store is not None:
            self._store.close()
        self._logs.close()
