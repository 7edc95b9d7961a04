"""The policy model registry in MLflow: register, promote behind an evidence gate, roll back.

A registered ``tip-policy`` version is an MLflow pyfunc holding the policy's serialised state
(hyperparameters, learned statistics, feature-spec version; see ``Policy.to_bytes``).
Aliases, not stages: ``challenger`` is the latest sweep winner, ``champion`` is what serving
loads.  Every version carries its off-policy estimate as tags, and every alias move records
who moved it and why, so ``rollback`` can undo it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from tipgraph.policies import Policy, policy_from_bytes

logger = logging.getLogger(__name__)

MODEL_NAME = "tip-policy"
CHALLENGER, CHAMPION = "challenger", "champion"
STATE_ARTIFACT = "policy_state.bin"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (missing alias, failed gate, ...)."""


class PolicyModel(PythonModel):
    """pyfunc: ``predict`` takes one event's candidate features, array of shape (K, d),
    and returns the policy's probability for every candidate, shape (K,)."""

    def load_context(self, context: Any) -> None:
        self.policy = policy_from_bytes(Path(context.artifacts["state"]).read_bytes())

    def predict(self, context: Any, model_input: Any, params: Any = None) -> np.ndarray:
        return self.policy.distribution(np.asarray(model_input, dtype=np.float64))


@dataclass(frozen=True)
class OffPolicyEvidence:
    """What the sweep measured for one policy, on one log."""

    estimator: str
    value: float
    lower: float
    upper: float
    n_events: int

    def tags(self, prefix: str = "ope") -> dict[str, str]:
        return {f"{prefix}.{k}": str(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str], prefix: str = "ope") -> OffPolicyEvidence | None:
        try:
            return cls(
                estimator=tags[f"{prefix}.estimator"],
                value=float(tags[f"{prefix}.value"]),
                lower=float(tags[f"{prefix}.lower"]),
                upper=float(tags[f"{prefix}.upper"]),
                n_events=int(tags[f"{prefix}.n_events"]),
            )
        except KeyError:
            return None


@dataclass(frozen=True)
class RegisteredPolicy:
    name: str
    version: str
    policy: Policy
    # Rewards with ids up to this one are already in the policy's statistics.
    trained_through_reward_id: int = 0

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


class PolicyRegistry:
    def __init__(
        self,
        tracking_uri: str,
        *,
        model_name: str = MODEL_NAME,
        artifact_root: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.artifact_root = artifact_root or _default_artifact_root(tracking_uri)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (with our artifact root) if missing."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        # An explicit artifact root: MLflow's default is relative to the working directory,
        # which differs between the CLI, Ray workers and tests.
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        return str(self.client.create_experiment(name, artifact_location=location))

    def register(
        self,
        policy: Policy,
        evidence: OffPolicyEvidence,
        *,
        champion_on_same_data: OffPolicyEvidence | None = None,
        trained_through_reward_id: int = 0,
        run_id: str | None = None,
        experiment: str = "tipgraph-tuning",
    ) -> str:
        """Log ``policy`` as a pyfunc, register it and point ``challenger`` at it.

        ``champion_on_same_data`` is the current champion's estimate on the log the
        challenger was judged on; the promotion gate compares against it.
        """
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / STATE_ARTIFACT
            state.write_bytes(policy.to_bytes())
            experiment_id = None if run_id is not None else self.experiment_id(experiment)
            with mlflow.start_run(run_id=run_id, experiment_id=experiment_id):
                info = mlflow.pyfunc.log_model(
                    name="policy",
                    python_model=PolicyModel(),
                    artifacts={"state": str(state)},
                    registered_model_name=self.model_name,
                    # Explicit: inferring requirements imports and inspects the world.
                    pip_requirements=["tipgraph"],
                    metadata={"feature_spec": policy.spec_version},
                )
        version = str(info.registered_model_version)
        tags = {
            "feature_spec": policy.spec_version,
            "policy_kind": policy.kind,
            "policy_version": policy.version,
            "trained_through_reward_id": str(trained_through_reward_id),
            **evidence.tags(),
        }
        if champion_on_same_data is not None:
            tags.update(champion_on_same_data.tags("champion_same_data"))
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, version, key, value)
        self.client.set_registered_model_alias(self.model_name, CHALLENGER, version)
        logger.info("registered %s version %s as %s", self.model_name, version, CHALLENGER)
        return version

    def version_of(self, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException:
            return None

    def tags_of(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.model_name, version).tags)

    def load(
        self, alias_or_version: str, *, expected_spec_version: str | None = None
    ) -> RegisteredPolicy:
        """Load a version (or ``@alias``) back into a policy; refuses other features."""
        version = (
            self.version_of(alias_or_version[1:])
            if alias_or_version.startswith("@")
            else alias_or_version
        )
        if version is None:
            raise RegistryError(f"{self.model_name}{alias_or_version} does not exist")
        # The version's concrete location, asked through this client: a models:/ URI
        # would be resolved through MLflow's process-global registry URI instead.
        location = self.client.get_model_version_download_uri(self.model_name, version)
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/artifacts/{STATE_ARTIFACT}"
        )
        policy = policy_from_bytes(
            Path(path).read_bytes(), expected_spec_version=expected_spec_version
        )
        through = int(self.tags_of(version).get("trained_through_reward_id", "0"))
        return RegisteredPolicy(self.model_name, version, policy, through)

    def promote(self, *, force: bool = False, by: str = "tipgraph promote") -> str:
        """Move ``champion`` to the challenger if the evidence says so; returns why.

        Gate: the challenger's lower confidence bound must beat the champion's estimate on
        the same data.  ``force`` skips the gate (for humans, recorded as such).
        """
        challenger = self.version_of(CHALLENGER)
        if challenger is None:
            raise RegistryError("no challenger to promote: run `tipgraph tune` first")
        champion = self.version_of(CHAMPION)
        if champion == challenger:
            raise RegistryError(f"version {challenger} is already the champion")
        tags = self.tags_of(challenger)
        evidence = OffPolicyEvidence.from_tags(tags)
        baseline = OffPolicyEvidence.from_tags(tags, "champion_same_data")
        if force:
            reason = f"forced by {by}"
        elif champion is None:
            reason = "first champion"
        elif evidence is None or baseline is None:
            raise RegistryError(
                f"version {challenger} has no estimate against the champion on the same data; "
                "re-run the sweep or use --force"
            )
        elif evidence.lower > baseline.value:
            reason = (
                f"challenger {evidence.estimator} lower bound {evidence.lower:.4f} > "
                f"champion estimate {baseline.value:.4f} on {evidence.n_events} events"
            )
        else:
            raise RegistryError(
                f"not promoted: challenger lower bound {evidence.lower:.4f} does not beat the "
                f"champion estimate {baseline.value:.4f} on the same {evidence.n_events} events"
            )
        self._move_champion(challenger, previous=champion, reason=reason)
        return reason

    def rollback(self, *, by: str = "tipgraph rollback") -> str:
        """Point ``champion`` back at the version it replaced."""
        champion = self.version_of(CHAMPION)
        if champion is None:
            raise RegistryError("no champion to roll back")
        previous = self.tags_of(champion).get("previous_champion")
        if not previous:
            raise RegistryError(f"champion version {champion} has no previous champion")
        reason = f"rolled back from version {champion} by {by}"
        self.client.set_registered_model_alias(self.model_name, CHAMPION, previous)
        self.client.set_model_version_tag(
            self.model_name, previous, "promotion", json.dumps({"reason": reason})
        )
        return reason

    def _move_champion(self, version: str, *, previous: str | None, reason: str) -> None:
        if previous is not None:
            self.client.set_model_version_tag(
                self.model_name, version, "previous_champion", previous
            )
        self.client.set_model_version_tag(
            self.model_name, version, "promotion", json.dumps({"reason": reason})
        )
        self.client.set_registered_model_alias(self.model_name, CHAMPION, version)
        logger.info("%s champion -> version %s: %s", self.model_name, version, reason)


def _default_artifact_root(tracking_uri: str) -> str | None:
    """``sqlite:///dir/mlflow.db`` -> ``dir/mlartifacts`` (absolute); servers decide their own."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return str(Path(tracking_uri[len(prefix) :]).resolve().parent / "mlartifacts")
