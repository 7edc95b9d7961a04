"""Scoring stage: the served policy scores every request's candidates.

Replicas stay identical through :meth:`PolicyService.sync` (see tipgraph.scoring); the
shadow policies run in their own deployment (deployments.shadows).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ray import serve

from tipgraph.batching import ItemFailure, run_each
from tipgraph.champion import ChampionFollower
from tipgraph.logs import ReplicaLogs
from tipgraph.periodic import Periodic
from tipgraph.scoring import PolicyScore, PolicyService, RewardItem
from tipgraph.settings import PolicySettings, TipgraphSettings, parse_policy
from tipgraph.store import open_store

logger = logging.getLogger(__name__)


@serve.deployment(name="scoring")
class PolicyScorer:
    def __init__(
        self,
        settings: TipgraphSettings,
        policy: PolicySettings,
        *,
        follow_registry: bool = False,
    ) -> None:
        self._logs = ReplicaLogs(settings.logs).start()
        self._configured = policy
        self._service = PolicyService.for_features(policy)
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
        """The served policy's answer for every (candidate matrix, event_id), in order."""
        return run_each(lambda item: self._service.score(*item), items)

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

    def learn_batch(self, items: list[RewardItem]) -> list[bool | ItemFailure]:
        """:meth:`learn` for each of a batch (one remote call for many feedbacks)."""
        return run_each(lambda item: self._service.learn(*item), items)

    def sync(self) -> int:
        return self._service.sync(self._store)

    def snapshot(self) -> dict[str, object]:
        return self._service.snapshot()

    async def __del__(self) -> None:
        # Async, as Serve awaits it: Python's own finalizer call at garbage collection then
        # only makes a coroutine nobody awaits, instead of closing everything twice.
        if self._watcher is not None:
            self._watcher.stop()
        self._syncer.stop()
        self._store.close()
        self._logs.close()
