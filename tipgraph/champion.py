"""Serving follows the registry: load the alias target, hot-swap when it moves.

The served policy starts from ``models:/<model>@<alias>`` when one exists and a replica
checks the alias every ``registry.check_interval_s``.  A new target is loaded and caught up
on the rewards logged after its training data *before* it is swapped in, so serving never
pauses and no reward is counted twice.  A model learned on other features is refused with
an error in the log, and serving continues on the model it has.
"""

from __future__ import annotations

import logging

from tipgraph.features import FEATURE_SPEC
from tipgraph.policies import PolicyStateError
from tipgraph.registry import PolicyRegistry
from tipgraph.scoring import PolicyService
from tipgraph.settings import TipgraphSettings
from tipgraph.store import DecisionStore

logger = logging.getLogger(__name__)


class ChampionFollower:
    def __init__(
        self, settings: TipgraphSettings, service: PolicyService, store: DecisionStore
    ) -> None:
        # Constructing the registry client imports MLflow: only replicas that follow do.
        self._registry = PolicyRegistry(
            settings.registry.tracking_uri, model_name=settings.registry.model_name
        )
        self._alias = settings.registry.serve_alias or "champion"
        self._service = service
        self._store = store
        self._refused: set[str] = set()

    def check(self) -> bool:
        """Swap in the alias target if it changed; True if it did."""
        version = self._registry.version_of(self._alias)
        ref = f"{self._registry.model_name}/{version}"
        if version is None or ref == self._service.model_ref or version in self._refused:
            return False
        try:
            loaded = self._registry.load(version, expected_spec_version=FEATURE_SPEC.version)
        except PolicyStateError as err:
            self._refused.add(version)
            logger.error(
                "refusing %s (@%s): %s; still serving %s",
                ref,
                self._alias,
                err,
                self._service.model_ref or self._service.policy.version,
            )
            return False
        candidate = PolicyService(
            loaded.policy, model_ref=loaded.ref, watermark=loaded.trained_through_reward_id
        )
        caught_up = self._service.swap(candidate, self._store)
        logger.info("now serving %s (@%s), caught up on %d rewards", ref, self._alias, caught_up)
        return True
