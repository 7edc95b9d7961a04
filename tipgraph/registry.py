"""The policy model registry in MLflow: register, promote behind an evidence gate, roll back.

A registered ``tip-policy`` version is an MLflow pyfunc logged from code
(:mod:`tipgraph.policy_model_code`) around one artifact, the policy's serialised state
(hyperparameters, learned statistics, feature-spec version; see ``Policy.to_bytes``).
Aliases, not stages: ``challenger`` is the latest sweep winner, ``champion`` is what serving
loads.  Every version carries as tags its off-policy estimate, the *baseline* it must beat
(measured by the same sweep on the same log), its hyperparameters and the log it was tuned on;
every alias move is appended to the version's promotion history, so ``rollback`` can undo it
and ``tipgraph registry show`` can tell it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tipgraph.policies import Policy, policy_from_bytes

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.signature import ModelSignature

logger = logging.getLogger(__name__)

# MLflow draws a tqdm bar for every artifact download (a policy state is one small file), into
# the operator's terminal and the replicas' logs alike; an explicit setting still wins.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

MODEL_NAME = "tip-policy"
CHALLENGER, CHAMPION = "challenger", "champion"
STATE_ARTIFACT = "policy_state.bin"
STATE_ARTIFACT_KEY = "state"
"""The artifact's name in the pyfunc (``tipgraph.policy_model`` reads it by this key)."""
MODEL_CODE = Path(__file__).with_name("policy_model_code.py")
"""Stored with every version and run when it loads as a pyfunc; never imported here, since
it registers its model with MLflow as it runs."""
HISTORY_KEEP = 20
"""Promotion events kept per version (a tag value; the newest win)."""
LEGACY_BASELINE_NAME = "the baseline the sweep recorded (unnamed: registered before names)"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (missing alias, failed gate, ...)."""


@dataclass(frozen=True)
class OffPolicyEvidence:
    """What the sweep measured for one policy, on one log."""

    estimator: str
    value: float
    lower: float
    upper: float
    n_events: int

    def tags(self, prefix: str = "ope") -> dict[str, str]:
        return {f"{prefix}.{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str], prefix: str = "ope") -> OffPolicyEvidence | None:
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

    def describe(self) -> str:
        return f"{self.value:.4f} [{self.lower:.4f}, {self.upper:.4f}]"

    def beats(self, baseline: OffPolicyEvidence) -> bool:
        """The promotion gate's test: this lower bound is above the baseline's estimate."""
        return self.lower > baseline.value


@dataclass(frozen=True)
class Baseline:
    """What a challenger must beat, replayed by the same sweep on the same log: the champion's
    configuration, or the served configured policy's when there is no comparable champion."""

    name: str
    """E.g. ``served policy linucb (linucb)`` or ``champion tip-policy/3 (squarecb)``."""
    evidence: OffPolicyEvidence
    champion_version: str | None
    """The champion when the sweep ran (None: there was none); the gate refuses evidence
    gathered against a champion that has moved since."""
    recorded_champion: bool = True
    """False for versions registered before the champion was recorded with the baseline."""

    def tags(self) -> dict[str, str]:
        return {
            **self.evidence.tags("baseline"),
            "baseline.name": self.name,
            "baseline.champion_version": self.champion_version or "",
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Baseline | None:
        evidence = OffPolicyEvidence.from_tags(tags, "baseline")
        if evidence is not None:
            return cls(
                name=tags.get("baseline.name", LEGACY_BASELINE_NAME),
                evidence=evidence,
                champion_version=tags.get("baseline.champion_version") or None,
            )
        # Registered before baselines were named: the same numbers under an older prefix.
        legacy = OffPolicyEvidence.from_tags(tags, "champion_same_data")
        if legacy is None:
            return None
        return cls(LEGACY_BASELINE_NAME, legacy, None, recorded_champion=False)


@dataclass(frozen=True)
class Lineage:
    """The log a version was tuned on."""

    source: str
    """Where the events came from (a store URL without its password, a file, the simulator)."""
    n_events: int
    trained_through_reward_id: int = 0
    """Rewards with ids up to this one are already in the policy's statistics."""
    filters: Mapping[str, str] = field(default_factory=dict)
    """The log filters that were set (since, until, prompt_version, policy_name)."""
    sweep_run_id: str | None = None

    def tags(self) -> dict[str, str]:
        return {
            "log.source": self.source,
            "log.n_events": str(self.n_events),
            "log.filters": json.dumps(dict(self.filters), sort_keys=True),
            "trained_through_reward_id": str(self.trained_through_reward_id),
            **({"sweep_run_id": self.sweep_run_id} if self.sweep_run_id else {}),
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Lineage | None:
        if "log.source" not in tags:
            return None
        return cls(
            source=tags["log.source"],
            n_events=int(tags.get("log.n_events", "0")),
            trained_through_reward_id=int(tags.get("trained_through_reward_id", "0")),
            filters=json.loads(tags.get("log.filters", "{}")),
            sweep_run_id=tags.get("sweep_run_id"),
        )


PromotionAction = Literal["promoted", "forced", "replaced", "rolled back to", "rolled back from"]


@dataclass(frozen=True)
class PromotionEvent:
    """One move of the champion alias, as seen by one version."""

    at: str
    action: PromotionAction
    by: str
    reason: str
    other_version: str | None = None
    """The version it replaced (promoted, forced, rolled back to) or was replaced by."""


@dataclass(frozen=True)
class VersionRecord:
    """Everything the registry knows of one version, for ``tipgraph registry``."""

    version: str
    created_at: str
    kind: str
    policy_version: str
    feature_spec: str
    hyperparameters: Mapping[str, Any] | None
    evidence: OffPolicyEvidence | None
    baseline: Baseline | None
    lineage: Lineage | None
    aliases: tuple[str, ...]
    history: tuple[PromotionEvent, ...]
    run_id: str | None

    @property
    def passes_gate(self) -> bool | None:
        """The gate's verdict on the recorded numbers (None: nothing to judge)."""
        if self.evidence is None or self.baseline is None:
            return None
        return self.evidence.beats(self.baseline.evidence)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passes_gate"] = self.passes_gate
        return data


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
        # MLflow takes seconds and ~130 MB to import: paid here, by the processes that use the
        # registry, not by every scoring replica that imports this module.
        from mlflow import MlflowClient

        self.client: MlflowClient = MlflowClient(
            tracking_uri=tracking_uri, registry_uri=tracking_uri
        )

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created (with our artifact root) if missing."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        # An explicit artifact root: MLflow's default is relative to the working directory,
        # which differs between the CLI, Ray workers and tests.
        location = f"{self.artifact_root}/{name}" if self.artifact_root else None
        return str(self.client.create_experiment(name, artifact_location=location))

    # -- registering -----------------------------------------------------------------------
    def register(
        self,
        policy: Policy,
        evidence: OffPolicyEvidence,
        *,
        baseline: Baseline | None = None,
        lineage: Lineage | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        experiment: str = "tipgraph-tuning",
    ) -> str:
        """Log ``policy`` as a pyfunc, register it and point ``challenger`` at it.

        ``baseline`` is what the gate compares against (the sweep's replay of the champion or
        served configuration on the challenger's log); without one, ``promote`` needs --force.
        """
        import mlflow.pyfunc  # heavy, as in __init__

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / STATE_ARTIFACT
            state.write_bytes(policy.to_bytes())
            experiment_id = None if run_id is not None else self.experiment_id(experiment)
            with mlflow.start_run(run_id=run_id, experiment_id=experiment_id) as run:
                info = mlflow.pyfunc.log_model(
                    name="policy",
                    python_model=str(MODEL_CODE),
                    artifacts={STATE_ARTIFACT_KEY: str(state)},
                    # Explicit: inferring requirements imports and inspects the world.
                    pip_requirements=["tipgraph"],
                    metadata={"feature_spec": policy.spec_version},
                    signature=_policy_signature(),
                    # Two candidates with all-zero features: documents the (K, d) input; MLflow
                    # warns when a signature comes without one.
                    input_example=np.zeros((2, policy.dim)),
                )
                logged_run_id = run.info.run_id
        tags = {
            "feature_spec": policy.spec_version,
            "policy_kind": policy.kind,
            "policy_version": policy.version,
            "trained_through_reward_id": "0",
            **evidence.tags(),
            **(baseline.tags() if baseline is not None else {}),
            **(lineage.tags() if lineage is not None else {}),
        }
        if hyperparameters is not None:
            tags["hyperparameters"] = json.dumps(dict(hyperparameters), sort_keys=True)
        # Through the client, not log_model(registered_model_name=...), which prints
        # "Successfully registered model ..." lines of its own.
        self._ensure_registered_model()
        created = self.client.create_model_version(
            self.model_name,
            source=info.model_uri,
            run_id=logged_run_id,
            tags=tags,
            model_id=info.model_id,
        )
        version = str(created.version)
        self.client.set_registered_model_alias(self.model_name, CHALLENGER, version)
        logger.info("registered %s version %s as %s", self.model_name, version, CHALLENGER)
        return version

    def _ensure_registered_model(self) -> None:
        from mlflow.exceptions import MlflowException  # heavy, as in __init__
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

        try:
            self.client.create_registered_model(self.model_name)
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise

    # -- reading ---------------------------------------------------------------------------
    def version_of(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException  # heavy, as in __init__

        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except MlflowException:
            return None

    def tags_of(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.model_name, version).tags)

    def _resolve(self, alias_or_version: str) -> str:
        version = (
            self.version_of(alias_or_version[1:])
            if alias_or_version.startswith("@")
            else alias_or_version
        )
        if version is None:
            raise RegistryError(f"{self.model_name}{alias_or_version} does not exist")
        return version

    def load(
        self, alias_or_version: str, *, expected_spec_version: str | None = None
    ) -> RegisteredPolicy:
        """Load a version (or ``@alias``) back into a policy; refuses other features.

        Reads the state artifact directly, so it loads versions logged from code and the
        older cloudpickled ones alike, and runs no stored code.
        """
        version = self._resolve(alias_or_version)
        # The version's concrete location, asked through this client: a models:/ URI
        # would be resolved through MLflow's process-global registry URI instead.
        location = self.client.get_model_version_download_uri(self.model_name, version)
        import mlflow.artifacts  # heavy, as in __init__

        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{location.rstrip('/')}/artifacts/{STATE_ARTIFACT}"
        )
        policy = policy_from_bytes(
            Path(path).read_bytes(), expected_spec_version=expected_spec_version
        )
        through = int(self.tags_of(version).get("trained_through_reward_id", "0"))
        return RegisteredPolicy(self.model_name, version, policy, through)

    def describe(self, alias_or_version: str) -> VersionRecord:
        """One version's kind, hyperparameters, evidence, baseline, lineage and history."""
        from mlflow.exceptions import MlflowException  # heavy, as in __init__

        version = self._resolve(alias_or_version)
        try:
            found = self.client.get_model_version(self.model_name, version)
        except MlflowException as err:
            raise RegistryError(f"{self.model_name} has no version {version!r}") from err
        return _record(found)

    def versions(self) -> list[VersionRecord]:
        """Every version, newest first."""
        from mlflow.exceptions import MlflowException  # heavy, as in __init__

        try:
            found = self.client.search_model_versions(f"name = '{self.model_name}'")
            model = self.client.get_registered_model(self.model_name) if found else None
        except MlflowException as err:
            raise RegistryError(f"cannot list {self.model_name}: {err}") from err
        # Search results leave a version's aliases out; the registered model has them all.
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases if model is not None else {}).items():
            aliases.setdefault(str(version), []).append(alias)
        records = (
            replace(_record(v), aliases=tuple(sorted(aliases.get(str(v.version), ()))))
            for v in found
        )
        return sorted(records, key=lambda r: -int(r.version))

    # -- moving the champion ---------------------------------------------------------------
    def promote(self, *, force: bool = False, by: str = "tipgraph promote") -> str:
        """Move ``champion`` to the challenger if the evidence says so; returns why.

        Gate, always (a first champion included): the challenger's lower confidence bound
        must beat its baseline's estimate on the same log, and the baseline must have been
        measured against the champion that is current now.  ``force`` skips the gate, for
        humans, and the promotion is recorded as forced.
        """
        challenger = self.version_of(CHALLENGER)
        if challenger is None:
            raise RegistryError("no challenger to promote: run `tipgraph tune` first")
        champion = self.version_of(CHAMPION)
        if champion == challenger:
            raise RegistryError(f"version {challenger} is already the champion")
        tags = self.tags_of(challenger)
        if force:
            reason = f"gate skipped ({_gate_summary(tags)})"
            self._move_champion(challenger, previous=champion, reason=reason, by=by, forced=True)
            return f"forced by {by}; {reason}"
        reason = gate(challenger, tags, current_champion=champion)
        self._move_champion(challenger, previous=champion, reason=reason, by=by, forced=False)
        return reason

    def champion_since(self) -> tuple[str, datetime | None] | None:
        """The current champion and when it took the alias (its latest promoted, forced or
        rolled back to event; None without a dated, readable record); None without a
        champion."""
        champion = self.version_of(CHAMPION)
        if champion is None:
            return None
        taken: datetime | None = None
        for event in _history(self.tags_of(champion)):
            if event.action not in ("promoted", "forced", "rolled back to"):
                continue
            try:
                at = datetime.fromisoformat(event.at)
            except ValueError:  # an undated legacy record, or a hand-written tag
                continue
            taken = at if at.tzinfo else at.replace(tzinfo=UTC)
        return champion, taken

    def rollback(self, *, by: str = "tipgraph rollback", expected: str | None = None) -> str:
        """Point ``champion`` back at the version it replaced; with ``expected``, only if
        that is still the champion (it was judged, and may have been replaced since)."""
        champion = self.version_of(CHAMPION)
        if champion is None:
            raise RegistryError("no champion to roll back")
        if expected is not None and champion != expected:
            raise RegistryError(
                f"the champion is version {champion} now, not the judged version {expected}"
            )
        previous = self.tags_of(champion).get("previous_champion")
        if not previous:
            raise RegistryError(f"champion version {champion} has no previous champion")
        reason = f"rolled back from version {champion} by {by}"
        self.client.set_registered_model_alias(self.model_name, CHAMPION, previous)
        self._record_event(previous, "rolled back to", by, reason, other=champion)
        self._record_event(champion, "rolled back from", by, reason, other=previous)
        return reason

    def _move_champion(
        self, version: str, *, previous: str | None, reason: str, by: str, forced: bool
    ) -> None:
        if previous is not None:
            self.client.set_model_version_tag(
                self.model_name, version, "previous_champion", previous
            )
        self.client.set_registered_model_alias(self.model_name, CHAMPION, version)
        self._record_event(version, "forced" if forced else "promoted", by, reason, other=previous)
        if previous is not None:
            self._record_event(previous, "replaced", by, reason, other=version)
        logger.info("%s champion -> version %s: %s", self.model_name, version, reason)

    def _record_event(
        self, version: str, action: PromotionAction, by: str, reason: str, *, other: str | None
    ) -> None:
        event = PromotionEvent(_now(), action, by, reason, other)
        history = [*_history(self.tags_of(version)), event][-HISTORY_KEEP:]
        self.client.set_model_version_tag(
            self.model_name,
            version,
            "promotion_history",
            json.dumps([asdict(e) for e in history]),
        )
        # The latest event alone, under the tag versions before the history carried.
        self.client.set_model_version_tag(
            self.model_name, version, "promotion", json.dumps({"reason": reason})
        )


def gate(challenger: str, tags: Mapping[str, str], *, current_champion: str | None) -> str:
    """The promotion gate on a challenger's tags: the reason it passes, or RegistryError."""
    evidence = OffPolicyEvidence.from_tags(tags)
    baseline = Baseline.from_tags(tags)
    if evidence is None or baseline is None:
        raise RegistryError(
            f"version {challenger} has no baseline estimate on its own log to "
            "compare with; re-run `tipgraph tune`, or `tipgraph promote --force` (recorded "
            "as forced)"
        )
    if baseline.recorded_champion and baseline.champion_version != current_champion:
        then = f"version {baseline.champion_version}" if baseline.champion_version else "none"
        raise RegistryError(
            f"version {challenger} was judged against {baseline.name} while the "
            f"champion was {then}; the champion is now "
            f"{'version ' + current_champion if current_champion else 'none'}. Re-run "
            "`tipgraph tune` to judge it against the current one"
        )
    versus = (
        f"{baseline.evidence.value:.4f}, the estimate of {baseline.name} on the same "
        f"{evidence.n_events} events ({evidence.estimator})"
    )
    if evidence.beats(baseline.evidence):
        return f"challenger version {challenger} lower bound {evidence.lower:.4f} beats {versus}"
    raise RegistryError(
        f"challenger version {challenger} lower bound {evidence.lower:.4f} does "
        f"not beat {versus}; `tipgraph promote --force` skips the gate (recorded as forced)"
    )


def _gate_summary(tags: Mapping[str, str]) -> str:
    evidence = OffPolicyEvidence.from_tags(tags)
    baseline = Baseline.from_tags(tags)
    if evidence is None or baseline is None:
        return "no baseline recorded"
    return f"lower bound {evidence.lower:.4f} vs {baseline.evidence.value:.4f} of {baseline.name}"


def _history(tags: Mapping[str, str]) -> list[PromotionEvent]:
    raw = tags.get("promotion_history")
    if raw:
        return [PromotionEvent(**event) for event in json.loads(raw)]
    if "promotion" in tags:  # the one reason versions before the history kept
        reason = json.loads(tags["promotion"]).get("reason", "")
        return [PromotionEvent("", "promoted", "", reason, tags.get("previous_champion"))]
    return []


def _record(found: ModelVersion) -> VersionRecord:
    tags: dict[str, str] = dict(found.tags)
    params = tags.get("hyperparameters")
    return VersionRecord(
        version=str(found.version),
        created_at=datetime.fromtimestamp(found.creation_timestamp / 1000, UTC).isoformat(
            timespec="seconds"
        ),
        kind=tags.get("policy_kind", "?"),
        policy_version=tags.get("policy_version", "?"),
        feature_spec=tags.get("feature_spec", "?"),
        hyperparameters=json.loads(params) if params else None,
        evidence=OffPolicyEvidence.from_tags(tags),
        baseline=Baseline.from_tags(tags),
        lineage=Lineage.from_tags(tags)
        or (
            Lineage("(not recorded)", 0, int(tags["trained_through_reward_id"]))
            if "trained_through_reward_id" in tags
            else None
        ),
        aliases=tuple(sorted(found.aliases or ())),
        history=tuple(_history(tags)),
        run_id=found.run_id,
    )


def _policy_signature() -> ModelSignature:
    """(K, d) candidate features -> (K,) probabilities; stated, since MLflow cannot infer it."""
    from mlflow.models.signature import ModelSignature  # heavy, as in PolicyRegistry
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float64), (-1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float64), (-1,))]),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def registry_exists(tracking_uri: str) -> bool:
    """False for a ``sqlite:///`` registry whose file is missing: readers (status, the
    registry view) must not open it, since opening creates an empty registry."""
    database = _sqlite_database(tracking_uri)
    return database is None or database.exists()


def _sqlite_database(tracking_uri: str) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI (None for a server)."""
    prefix = "sqlite:///"
    return Path(tracking_uri.removeprefix(prefix)) if tracking_uri.startswith(prefix) else None


def _default_artifact_root(tracking_uri: str) -> str | None:
    """``sqlite:///dir/mlflow.db`` -> ``dir/mlartifacts`` (absolute); servers decide their own."""
    database = _sqlite_database(tracking_uri)
    return None if database is None else str(database.resolve().parent / "mlartifacts")
