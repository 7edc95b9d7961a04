"""A policy as a service: score candidates, learn each reward exactly once, stay in sync.

Many replicas, one model.  A policy's state is additive (Σxxᵀ, Σrx, n), and every reward
logged in the store's ``rewards`` table is a rank-one delta of it.  Each replica

* applies the feedback routed to it at once (:meth:`PolicyService.learn`), and
* every ``sync_interval_s`` reads the rewards logged after its watermark and applies
  the ones it has not applied yet (:meth:`PolicyService.sync`): what other replicas
  learned, and default rewards.

Every reward id is applied once per replica, and addition commutes, so after one sync
every replica holds exactly the model trained on all rewards, up to float rounding.  A
replica that starts or restarts syncs from watermark 0, which rebuilds it from the log.
The store hands out reward ids in commit order (see ``tipgraph.store``), so a watermark
never skips a row that commits late.

The scoring and shadow deployments are thin shells around this class.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from tipgraph.features import FEATURE_SPEC, upgrade_for_dim
from tipgraph.policies import Policy, make_policy
from tipgraph.settings import FaultSettings, PolicySettings
from tipgraph.store import DecisionStore
from tipgraph.store.records import TrainingEvent

SYNC_BATCH = 10_000

ShadowItem = tuple[np.ndarray, str, list[str], str]
"""What a shadow gets per event: (candidate matrix, event_id, candidate_ids, the served
policy's chosen candidate_id, to count agreement against)."""
RewardItem = tuple[int, list[float], float, float]
"""One reward to learn: (reward_id, the chosen candidate's features, reward, rewarded_at)."""


class InjectedFault(RuntimeError):
    """Raised by a policy configured with ``fault.fail`` (chaos testing of shadows)."""


@dataclass(frozen=True)
class PolicyScore:
    """One policy's answer for one event; travels between replicas, so plain lists."""

    policy_name: str
    policy_version: str
    scores: list[float]
    probabilities: list[float]
    chosen: int

    @property
    def chosen_probability(self) -> float:
        return self.probabilities[self.chosen]


class PolicyService:
    def __init__(self, policy: Policy, *, model_ref: str | None = None, watermark: int = 0) -> None:
        self.policy = policy
        self.model_ref = model_ref  # "tip-policy/3" when the policy came from the registry
        self.watermark = watermark  # every reward id <= watermark is applied
        self._ahead: set[int] = set()  # reward ids > watermark applied by direct feedback
        self.learned_directly = 0
        self.learned_by_sync = 0
        # Rewards logged on an earlier release's feature layout: carried over when it is
        # one of features.EARLIER_LAYOUTS, otherwise never learned.
        self.upgraded_from_earlier_layout = 0
        self.skipped_other_layout = 0
        # Scoring runs on the event loop, syncing in a background thread: one lock.
        self._lock = threading.Lock()

    @classmethod
    def for_features(cls, settings: PolicySettings) -> PolicyService:
        """A new, untrained policy of ``settings`` over the served feature layout."""
        return cls(make_policy(settings, FEATURE_SPEC.dim, spec_version=FEATURE_SPEC.version))

    @classmethod
    def rebuilt(cls, settings: PolicySettings, store: DecisionStore) -> PolicyService:
        """A policy of ``settings`` trained on every reward the log holds."""
        service = cls.for_features(settings)
        service.sync(store)
        return service

    def score(self, X: np.ndarray, event_id: str) -> PolicyScore:
        with self._lock:
            decision = self.policy.decide(X, event_id)
            version = self.policy.version
            if self.model_ref is not None:
                version = f"{self.model_ref}+{version}"
        return PolicyScore(
            policy_name=self.policy.name,
            policy_version=version,
            scores=decision.scores.tolist(),
            probabilities=decision.probabilities.tolist(),
            chosen=decision.chosen,
        )

    async def score_with_faults(
        self, X: np.ndarray, event_id: str, fault: FaultSettings
    ) -> PolicyScore:
        """:meth:`score`, after the configured delay and failure (shadow chaos testing)."""
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.fail:
            raise InjectedFault(f"injected fault in policy {self.policy.name}")
        return self.score(X, event_id)

    def learn(
        self,
        reward_id: int,
        features: Iterable[float],
        reward: float,
        rewarded_at: float | None,
    ) -> bool:
        """Apply one logged reward now; False (and no change) if it was applied already.
        ``rewarded_at``: the reward row's time (Unix seconds), which a forgetting policy
        weighs it by; without it such a policy leaves the reward to its next sync."""
        x = np.fromiter(features, dtype=np.float64)
        if rewarded_at is None and self.policy.forgets:
            return False
        with self._lock:
            if not self._apply(reward_id, x, reward, rewarded_at):
                return False
            self.learned_directly += 1
            return True

    def sync(self, store: DecisionStore) -> int:
        """Apply every logged reward after the watermark not applied yet; returns how many."""
        applied = 0
        while True:
            events = store.training_events(after_reward_id=self.watermark, limit=SYNC_BATCH)
            if not events:
                return applied
            applied += self._apply_events(events)
            if len(events) < SYNC_BATCH:
                return applied

    def _apply_events(self, events: list[TrainingEvent]) -> int:
        applied = 0
        with self._lock:
            for event in events:
                x = np.asarray(event.features, dtype=np.float64)
                applied += self._apply(
                    event.reward_id, x, event.reward, event.rewarded_at.timestamp()
                )
            self.watermark = max(self.watermark, events[-1].reward_id)
            self._ahead = {rid for rid in self._ahead if rid > self.watermark}
            self.learned_by_sync += applied
        return applied

    def _apply(self, reward_id: int, x: np.ndarray, reward: float, at: float | None) -> bool:
        if reward_id <= self.watermark or reward_id in self._ahead:
            return False
        if x.shape != (self.policy.dim,):
            upgrade = (
                upgrade_for_dim(x.shape[0])
                if x.ndim == 1 and self.policy.spec_version == FEATURE_SPEC.version
                else None
            )
            if upgrade is None:
                # Logged on a layout this model cannot take: it must not stop the
                # rewards after it.
                self.skipped_other_layout += 1
                return False
            # Logged before an upgrade that added features: learned with them at 0.
            x = upgrade.vector(x)
            self.upgraded_from_earlier_layout += 1
        self.policy.update(x, reward, at)
        self._ahead.add(reward_id)
        return True

    def swap(self, other: PolicyService, store: DecisionStore) -> int:
        """Catch ``other`` up on the rewards log, then serve its model from now on (a new
        champion, a reconfigured policy), atomically; returns the rewards caught up."""
        caught_up = other.sync(store)
        with self._lock:
            self.policy = other.policy
            self.model_ref = other.model_ref
            self.watermark = other.watermark
            self._ahead = set(other._ahead)
        return caught_up

    def snapshot(self) -> dict[str, object]:
        """The learned state, for tests and status pages."""
        with self._lock:
            stats = self.policy.stats_
            return {
                "policy_name": self.policy.name,
                "policy_version": self.policy.version,
                "model_ref": self.model_ref,
                "n_updates": self.policy.n_updates,
                "watermark": self.watermark,
                "learned_directly": self.learned_directly,
                "learned_by_sync": self.learned_by_sync,
                "gram": stats.gram_.tolist(),
                "b": stats.b_.tolist(),
            }
