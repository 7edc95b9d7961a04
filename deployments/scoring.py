"""Scoring and shadow stages: one deployment class, bound once per policy.

The served policy and every shadow run this same shell; a shadow only differs in its
name, its policy settings and (for chaos tests) injected faults.  Replicas of one
deployment stay identical through :meth:`PolicyService.sync` (see tipgraph.scoring).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray import serve

from tipgraph.batching import ItemFailure, run_each
from tipgraph.champion import ChampionFollower
from tipgraph.logs import ReplicaLogs
from tipgraph.metrics import replica_metrics
from tipgraph.periodic import Periodic
from tipgraph.scoring import PolicyScore, PolicyService, ShadowItem
from tipgraph.settings import FaultSettings, PolicySettings, TipgraphSettings, parse_policy
from tipgraph.shadows import ShadowScorer
from tipgraph.store import open_store
from tipgraph.wiring import decision_log

logger = logging.getLogger(__name__)


@serve.deployment(name="scoring")
class PolicyScorer:
    def __init__(
        self,
        settings: TipgraphSettings,
        policy: PolicySettings,
        fault: FaultSettings | None = None,
        *,
        follow_registry: bool = False,
        shadow: bool = False,
    ) -> None:
        self._logs = ReplicaLogs(settings.logs).start()
        self._metrics = replica_metrics(settings.metrics)
        self._fault = fault or FaultSettings()
        self._configured = policy
        self._service = PolicyService.for_features(policy)
        self._store = open_store(settings.store)
        # A shadow logs its own runs: the ingress, which every request waits on, spends
        # nothing on rows that no response needs.
        self._log = (
            decision_log(self._store, settings.store, owner=f"shadow-{policy.name}")
            if shadow
            else None
        )
        self._shadow = (
            ShadowScorer(self._service, self._fault, self._log, self._metrics)
            if self._log is not None
            else None
        )
        self._follower: ChampionFollower | None = None
        if follow_registry and settings.registry.serve_alias:
            self._follower = ChampionFollower(settings, self._service, self._store)
            self._follower.check()
        # A new or restarted replica starts from everything the log has learned so far.
        replayed = self._service.sync(self._store)
        logger.info("policy %s rebuilt from %d logged rewards", policy.name, replayed)
        self._syncer = Periodic(
            settings.learning.sync_interval_s, self.sync, name=f"sync-{policy.name}"
        ).start()
        self._watcher = (
            Periodic(
                settings.registry.check_interval_s, self._follower.check, name="champion-watch"
            ).start()
            if self._follower is not None
            else None
        )
        log = self._log
        self._gauges = (
            Periodic(
                settings.metrics.sample_interval_s,
                lambda: self._metrics.sample_decision_log(log),
                name="metrics",
            ).start()
            if log is not None
            else None
        )

    async def score_batch(
        self, items: list[tuple[np.ndarray, str]]
    ) -> list[PolicyScore | ItemFailure]:
        """The served policy's answer for every (candidate matrix, event_id), in order.
        (Faults are for shadows: they apply in :meth:`shadow_batch`.)"""
        return run_each(lambda item: self._service.score(*item), items)

    async def shadow_batch(self, items: list[ShadowItem]) -> list[str | None]:
        """Score every event (:data:`~tipgraph.scoring.ShadowItem`) as a shadow, log the
        runs and count them against the served pick from here.  Returns each item's error
        (None when scored), for the caller's failure count."""
        if self._shadow is None:
            raise RuntimeError("shadow_batch is for shadow deployments (bound with shadow=True)")
        return await self._shadow.score_batch(items)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's ``user_config`` (``tipgraph.serve_config.policy_user_config``): a policy
        changed in the deployed config replaces the served one in place, rebuilt from the
        rewards log, with no replica restarted."""
        policy = parse_policy(config["policy"])
        if policy == self._configured:
            return
        self._configured = policy
        if self._follower is not None and self._service.model_ref is not None:
            logger.info("policy %s configured; the registry's champion still serves", policy.name)
            return
        candidate = PolicyService.for_features(policy)
        caught_up = self._service.swap(candidate, self._store)
        logger.info(
            "now serving %s (%s), rebuilt from %d logged rewards",
            policy.name,
            candidate.policy.version,
            caught_up,
        )

    def learn(
        self,
        reward_id: int,
        features: list[float],
        reward: float,
        rewarded_at: float | None = None,
    ) -> bool:
        # rewarded_at is optional here only for an ingress of the previous release during
        # a rolling upgrade; a forgetting policy then leaves the reward to its next sync.
        return self._service.learn(reward_id, features, reward, rewarded_at)

    def sync(self) -> int:
        return self._service.sync(self._store)

    def snapshot(self) -> dict[str, object]:
        return self._service.snapshot()

    async def __del__(self) -> None:
        # Graceful shutdown: a shadow writes every buffered run first.
        if self._watcher is not None:
            self._watcher.stop()
        if self._gauges is not None:
            self._gauges.stop()
        self._syncer.stop()
        if self._log is not None:
            await self._log.close()
        self._store.close()
        self._logs.close()
