"""Generation stage: candidate tips from the tasks, an LLM, or both (tipgraph.generation).

With ``generation.serve_from: pool`` the request path reads the candidate pool and this
replica's background workers refill it (tipgraph.generation.pool); the replica also
removes expired entries every ``pool.cleanup_interval_s``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from ray import serve

from tipgraph.autoscaling import ItemLoad
from tipgraph.batching import ItemFailure, gather_each
from tipgraph.generation import CandidateSource, GenerationItem, GenerationResult
from tipgraph.generation.litellm_client import build_candidate_source
from tipgraph.generation.pool import PooledGenerator
from tipgraph.logs import ReplicaLogs
from tipgraph.metrics import replica_metrics
from tipgraph.periodic import Periodic
from tipgraph.settings import TipgraphSettings
from tipgraph.store import DecisionStore, StoreError, open_store

logger = logging.getLogger(__name__)

SERVES_FLUSH_S = 1.0
"""How often a replica writes the pool serves it counted (refreshes lag this much)."""


@serve.deployment(name="generation")
class CandidateGenerator:
    def __init__(self, settings: TipgraphSettings) -> None:
        # LiteLLM itself loads only when the configuration asks for an LLM (litellm_client).
        self._logs = ReplicaLogs(settings.logs).start()
        metrics = replica_metrics(settings.metrics)
        generation = settings.generation
        pooled = generation.source != "tasks" and generation.serve_from == "pool"
        self._store: DecisionStore | None = open_store(settings.store) if pooled else None
        self._source: CandidateSource
        self._source, self._refills = build_candidate_source(
            generation, self._store, metrics=metrics
        )
        self._load = ItemLoad()
        # Sampled, not pushed on change: open turns half-open with time, not with a call.
        self._gauges = Periodic(
            settings.metrics.sample_interval_s,
            lambda: metrics.sample_breaker(self._source.breaker),
            name="metrics",
        ).start()
        self._cleanup = (
            Periodic(
                generation.pool.cleanup_interval_s, self._clean_pool, name="pool-cleanup"
            ).start()
            if pooled
            else None
        )
        source = self._source
        self._serves = (
            Periodic(SERVES_FLUSH_S, source.flush_serves, name="pool-serves").start()
            if isinstance(source, PooledGenerator)
            else None
        )
        self._pool = generation.pool

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
        breaker = self._source.breaker
        return {"state": breaker.state, "times_opened": breaker.times_opened}

    def _clean_pool(self) -> None:
        if self._store is None:
            return
        now = datetime.now(UTC)
        try:
            removed = self._store.clean_pool(
                now,
                stale_before=now - timedelta(seconds=self._pool.claim_timeout_s),
                max_entries=self._pool.max_entries,
            )
        except StoreError as err:
            logger.warning("candidate-pool cleanup skipped, the store failed: %s", err)
            return
        if removed:
            logger.info("candidate pool: %d expired or evicted entries removed", removed)

    def __del__(self) -> None:
        self._gauges.stop()
        if self._serves is not None:
            self._serves.stop()
        if self._cleanup is not None:
            self._cleanup.stop()
        if self._refills is not None:
            self._refills.close()
        if self._store is not None:
            self._store.close()
        self._logs.close()
