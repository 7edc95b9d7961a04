"""The shadows stage: every shadow policy in one deployment.

Each shadow scores the events the ingress hands over after the answer is sent, and logs
its runs from here (:class:`tipgraph.shadows.ShadowSet`).  One deployment for all of them,
not one per shadow: a remote call costs the receiving replica about 1 ms of CPU however
little it carries, and every replica holds ~230 MiB (BENCHMARKS.md, issue 21).  Replicas
stay identical through each shadow's :meth:`~tipgraph.scoring.PolicyService.sync`.
"""

from __future__ import annotations

import logging
from typing import Any

from ray import serve

from tipgraph.batching import ItemFailure, run_each
from tipgraph.logs import ReplicaLogs
from tipgraph.metrics import replica_metrics
from tipgraph.periodic import Periodic
from tipgraph.scoring import RewardItem, ShadowItem
from tipgraph.settings import SHADOWS_DEPLOYMENT, TipgraphSettings, parse_policy
from tipgraph.shadows import ShadowErrors, ShadowSet
from tipgraph.store import open_store
from tipgraph.wiring import decision_log

logger = logging.getLogger(__name__)


@serve.deployment(name=SHADOWS_DEPLOYMENT)
class ShadowPolicies:
    def __init__(self, settings: TipgraphSettings) -> None:
        self._logs = ReplicaLogs(settings.logs).start()
        self._metrics = replica_metrics(settings.metrics)
        self._store = open_store(settings.store)
        # The shadows log their own runs: the ingress, which every request waits on,
        # spends nothing on rows that no response needs.
        self._log = decision_log(self._store, settings.store, owner=SHADOWS_DEPLOYMENT)
        # A new or restarted replica starts from everything the log has learned so far.
        self._shadows = ShadowSet.build(settings.shadows, self._store, self._log, self._metrics)
        logger.info("shadows %s rebuilt from the rewards log", self._shadows.names)
        self._syncer = Periodic(
            settings.learning.sync_interval_s, self.sync, name="sync-shadows"
        ).start()
        log = self._log
        self._gauges = Periodic(
            settings.metrics.sample_interval_s,
            lambda: self._metrics.sample_decision_log(log),
            name="metrics",
        ).start()

    async def shadow_batch(self, items: list[ShadowItem]) -> list[ShadowErrors]:
        """Every shadow scores every event (:data:`~tipgraph.scoring.ShadowItem`), logs its
        runs and counts them against the served pick; each event's errors by shadow."""
        return await self._shadows.score_batch(items)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's ``user_config`` (``tipgraph.serve_config.shadows_user_config``): a shadow
        policy changed in the deployed config replaces the running one in place, rebuilt
        from the rewards log, with no replica restarted."""
        policies = [parse_policy(fields) for fields in config["policies"]]
        changed = self._shadows.reconfigure(policies, self._store)
        if changed:
            logger.info("shadows %s reconfigured, rebuilt from the rewards log", changed)

    def learn(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> None:
        self._shadows.learn(reward_id, features, reward, rewarded_at)

    def learn_batch(self, items: list[RewardItem]) -> list[ItemFailure | None]:
        """:meth:`learn` for each of a batch (one remote call for many feedbacks)."""
        return run_each(lambda item: self._shadows.learn(*item), items)

    def sync(self) -> int:
        return self._shadows.sync(self._store)

    def snapshot(self, policy: str) -> dict[str, object]:
        return self._shadows.snapshot(policy)

    async def __del__(self) -> None:
        # Graceful shutdown: every buffered run is written first.
        self._gauges.stop()
        self._syncer.stop()
        await self._log.close()
        self._store.close()
        self._logs.close()
