"""Pool stage: refills of the candidate pool, off the request path (tipgraph.generation.pool).

In the graph when ``generation.serve_from`` is pool.  The generation replicas send it the
refills they find due and never wait for them; each replica queues them once per key,
asks the three model aliases, stores the entries, and removes expired ones every
``pool.cleanup_interval_s``.  Its process runs ``pool.nice`` steps below the other
replicas' CPU priority, so on a node it shares with the request path, refills get less
of the CPU.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta

from ray import serve

from tipgraph.generation.litellm_client import build_refill_queue, warm_up
from tipgraph.generation.pool import RefillJob
from tipgraph.logs import ReplicaLogs
from tipgraph.metrics import replica_metrics
from tipgraph.periodic import Periodic
from tipgraph.process import lower_cpu_priority
from tipgraph.settings import TipgraphSettings
from tipgraph.store import StoreError, open_store

logger = logging.getLogger(__name__)


@serve.deployment(name="pool")
class PoolRefiller:
    async def __init__(self, settings: TipgraphSettings) -> None:  # type: ignore[misc]  # Ray awaits it
        self._nice_before = os.getpriority(os.PRIO_PROCESS, 0)
        self._nice = lower_cpu_priority(settings.generation.pool.nice)
        self._logs = ReplicaLogs(settings.logs).start()
        metrics = replica_metrics(settings.metrics)
        self._pool = settings.generation.pool
        self._store = open_store(settings.store)
        self._queue, generator = build_refill_queue(
            settings.generation, self._store, metrics=metrics
        )
        await warm_up(generator.completer, settings.generation, refills=True)
        breaker = self._breaker = generator.breaker
        self._gauges = Periodic(
            settings.metrics.sample_interval_s,
            lambda: metrics.sample_breaker(breaker),
            name="metrics",
        ).start()
        self._cleanup = Periodic(
            self._pool.cleanup_interval_s, self._clean_pool, name="pool-cleanup"
        ).start()

    async def submit(self, jobs: list[RefillJob]) -> list[str]:
        """Queue the refills (``queued``, ``deduplicated`` or ``queue_full`` each)."""
        return self._queue.submit_many(jobs)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``autoscaling.signal: items`` scales on: refills queued and running."""
        return self._queue.load.report()

    def breaker_state(self) -> dict[str, object]:
        return {"state": self._breaker.state, "times_opened": self._breaker.times_opened}

    def status(self) -> dict[str, object]:
        """What this replica runs: its niceness, the refills pending and their outcomes."""
        return {
            "nice": self._nice,
            "nice_before": self._nice_before,
            "pending": self._queue.pending,
            "outcomes": dict(self._queue.outcomes),
        }

    def _clean_pool(self) -> None:
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
        self._cleanup.stop()
        self._queue.close()
        self._store.close()
        self._logs.close()
