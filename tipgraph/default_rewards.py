"""The periodic default reward: decisions whose feedback wait ran out are logged with
``learning.default_reward``; every replica's policy learns it at its next sync."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from tipgraph.metrics import Metrics
from tipgraph.settings import LearningSettings
from tipgraph.store import DecisionStore

logger = logging.getLogger(__name__)


class DefaultRewards:
    def __init__(self, learning: LearningSettings, store: DecisionStore, metrics: Metrics) -> None:
        self._learning = learning
        self._store = store
        self._metrics = metrics

    def apply(self) -> int:
        """Log the default reward for decisions past the wait; safe to run from every
        ingress replica at once.  Returns how many it logged."""
        if self._learning.default_reward is None:
            return 0
        now = datetime.now(UTC)
        applied = self._store.apply_default_rewards(
            older_than=now - timedelta(seconds=self._learning.reward_wait_s),
            reward=self._learning.default_reward,
            now=now,
        )
        if applied:
            logger.info("applied the default reward to %d decisions", applied)
            self._metrics.default_rewards(applied)
        return applied
