"""Scoring and shadow stages: one deployment class, bound once per policy.

The served policy and every shadow run this same shell; a shadow only differs in its
name, its policy settings and (for chaos tests) injected faults.  Replicas of one
deployment stay identical through :meth:`PolicyService.sync` (see tipgraph.scoring).
"""

from __future__ import annotations

import logging

import numpy as np
from ray import serve

from tipgraph.batching import ItemFailure, gather_each, run_each
from tipgraph.champion import ChampionFollower
from tipgraph.features import FEATURE_SPEC
from tipgraph.periodic import Periodic
from tipgraph.policies import make_policy
from tipgraph.scoring import PolicyScore, PolicyService
from tipgraph.settings import FaultSettings, PolicySettings, TipgraphSettings
from tipgraph.store import open_store

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
    ) -> None:
        self._fault = fault or FaultSettings()
        self._service = PolicyService(
            make_policy(policy, FEATURE_SPEC.dim, spec_version=FEATURE_SPEC.version)
        )
        self._store = open_store(settings.store)
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

    async def score_batch(
        self, items: list[tuple[np.ndarray, str]]
    ) -> list[PolicyScore | ItemFailure]:
        """The policy's answer for every (candidate matrix, event_id), in order."""
        if not self._fault.delay_s and not self._fault.fail:
            return run_each(lambda item: self._service.score(*item), items)
        return await gather_each(
            self._service.score_with_faults(X, event_id, self._fault) for X, event_id in items
        )

    def learn(self, reward_id: int, features: list[float], reward: float) -> bool:
        return self._service.learn(reward_id, features, reward)

    def sync(self) -> int:
        return self._service.sync(self._store)

    def snapshot(self) -> dict[str, object]:
        return self._service.snapshot()

    def __del__(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        self._syncer.stop()
        self._store.close()
