"""A policy as a service: score candidates, learn each feedback once, rebuild from the log.

The scoring and shadow deployments are thin shells around :class:`PolicyService`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from tipgraph.policies import Policy
from tipgraph.settings import FaultSettings
from tipgraph.store.records import TrainingEvent


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
    latency_ms: float

    @property
    def chosen_probability(self) -> float:
        return self.probabilities[self.chosen]


class PolicyService:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        # Event ids already learned from: a broadcast that races a rebuild is applied once.
        self._learned: set[str] = set()

    def rebuild(self, events: Iterable[TrainingEvent]) -> int:
        """Learn every logged (features, reward) not yet applied; returns how many."""
        applied = 0
        for event in events:
            applied += self.learn(event.event_id, event.features, event.reward)
        return applied

    def score(self, X: np.ndarray, event_id: str) -> PolicyScore:
        start = time.perf_counter()
        decision = self.policy.decide(X, event_id)
        return PolicyScore(
            policy_name=self.policy.name,
            policy_version=self.policy.version,
            scores=decision.scores.tolist(),
            probabilities=decision.probabilities.tolist(),
            chosen=decision.chosen,
            latency_ms=(time.perf_counter() - start) * 1000.0,
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

    def learn(self, event_id: str, features: Iterable[float], reward: float) -> bool:
        """Apply one feedback; False (and no change) if this event was learned already."""
        if event_id in self._learned:
            return False
        self.policy.update(np.fromiter(features, dtype=np.float64), reward)
        self._learned.add(event_id)
        return True

    def snapshot(self) -> dict[str, object]:
        """The learned state, for tests and status pages."""
        stats = self.policy.stats_
        return {
            "policy_name": self.policy.name,
            "policy_version": self.policy.version,
            "n_updates": self.policy.n_updates,
            "b": stats.b_.tolist(),
            "A_trace": float(np.trace(stats.A_)),
        }
