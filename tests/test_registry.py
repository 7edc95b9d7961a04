"""The policy registry against a real MLflow tracking server backend (SQLite file)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest

from tipgraph.policies import make_policy
from tipgraph.registry import (
    CHALLENGER,
    CHAMPION,
    Baseline,
    Lineage,
    OffPolicyEvidence,
    PolicyRegistry,
    RegistryError,
)
from tipgraph.settings import parse_policy

DIM = 5
REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "configs" / "tipgraph.yaml")


def trained(kind: str, seed: int, spec: str = "spec-a"):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    policy = make_policy(parse_policy(dict(name="served", kind=kind)), DIM, spec_version=spec)
    for _ in range(50):
        policy.update(rng.normal(size=DIM), float(rng.uniform()))
    return policy


def evidence(value: float, half_width: float = 0.02, lower: float | None = None):  # type: ignore[no-untyped-def]
    low = value - half_width if lower is None else lower
    return OffPolicyEvidence("progressive dr", value, low, value + half_width, 5000)


def served_baseline(value: float, champion: str | None = None) -> Baseline:
    return Baseline("served policy linucb (linucb)", evidence(value, 0.01), champion)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PolicyRegistry:
    monkeypatch.chdir(tmp_path)  # MLflow puts default artifact folders in the working dir
    return PolicyRegistry(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_registered_policy_loads_back_with_identical_probabilities(
    registry: PolicyRegistry,
) -> None:
    policy = trained("linucb", 0)
    version = registry.register(policy, evidence(0.8))
    assert registry.version_of(CHALLENGER) == version
    loaded = registry.load("@challenger", expected_spec_version="spec-a")
    X = np.random.default_rng(1).normal(size=(6, DIM))
    np.testing.assert_allclose(loaded.policy.distribution(X, "e"), policy.distribution(X, "e"))
    tags = registry.tags_of(version)
    assert tags["feature_spec"] == "spec-a" and tags["policy_kind"] == "linucb"
    assert float(tags["ope.lower"]) == pytest.approx(0.78)

    pyfunc = mlflow.pyfunc.load_model(f"models:/tip-policy/{version}")
    np.testing.assert_allclose(pyfunc.predict(X), policy.distribution(X))


def test_a_registered_version_stores_code_as_text_and_no_pickle(
    registry: PolicyRegistry,
) -> None:
    version = registry.register(trained("squarecb", 0), evidence(0.8))
    location = registry.client.get_model_version_download_uri("tip-policy", version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert "policy_model_code.py" in {Path(f).name for f in files}, files
    mlmodel = (local / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel


LEGACY_MODEL = Path(__file__).resolve().parent / "data" / "legacy_policy_model"


def test_versions_registered_before_models_from_code_still_load_and_gate(
    registry: PolicyRegistry, tmp_path: Path
) -> None:
    """A version exactly as the old code registered it: a cloudpickled
    ``tuning.registry.PolicyModel`` and the old, unnamed baseline tags."""
    assert b"tuning.registry" in (LEGACY_MODEL / "python_model.pkl").read_bytes()
    source = tmp_path / "legacy"
    shutil.copytree(LEGACY_MODEL, source)
    registry.client.create_registered_model(registry.model_name)
    version = registry.client.create_model_version(
        registry.model_name,
        source=str(source),
        tags={
            "feature_spec": "spec-a",
            "policy_kind": "linucb",
            "trained_through_reward_id": "41",
            **evidence(0.70).tags(),
            **evidence(0.60).tags("champion_same_data"),
        },
    ).version
    version = str(version)  # the client returns the number as an int here
    registry.client.set_registered_model_alias(registry.model_name, CHALLENGER, version)

    X = np.load(LEGACY_MODEL / "X.npy")
    expected = np.load(LEGACY_MODEL / "expected.npy")
    loaded = registry.load(version, expected_spec_version="spec-a")
    np.testing.assert_array_equal(loaded.policy.distribution(X), expected)
    assert loaded.trained_through_reward_id == 41
    mlflow.set_registry_uri(registry.tracking_uri)  # models:/ resolves through the global URI
    pyfunc = mlflow.pyfunc.load_model(f"models:/tip-policy/{version}")
    np.testing.assert_array_equal(pyfunc.predict(X), expected)

    record = registry.describe(version)
    assert record.baseline is not None and record.baseline.evidence.value == 0.60
    assert record.hyperparameters is None and record.passes_gate is True
    # The legacy baseline still gates (0.68 > 0.60), and names itself as such.
    assert "the baseline the sweep recorded" in registry.promote()


def test_the_first_promotion_is_gated_against_the_served_policy(
    registry: PolicyRegistry,
) -> None:
    # The transcript: winner 0.7974 [0.7583, 0.8415] vs served 0.7714, no champion.
    first = registry.register(
        trained("linucb", 0),
        OffPolicyEvidence("progressive dr", 0.7974, 0.7583, 0.8415, 5000),
        baseline=served_baseline(0.7714),
    )
    with pytest.raises(RegistryError) as refused:
        registry.promote()
    message = str(refused.value)
    assert "0.7583" in message and "0.7714" in message, message
    assert "served policy linucb (linucb)" in message and "5000 events" in message
    assert registry.version_of(CHAMPION) is None
    assert registry.describe(first).history == ()

    second = registry.register(
        trained("squarecb", 1), evidence(0.85), baseline=served_baseline(0.7714)
    )
    reason = registry.promote(by="tester")
    assert "lower bound 0.8300 beats 0.7714" in reason and "served policy linucb" in reason
    assert registry.version_of(CHAMPION) == second
    (event,) = registry.describe(second).history
    assert (event.action, event.by, event.other_version) == ("promoted", "tester", None)


def test_promotion_gate_rollback_and_force(registry: PolicyRegistry) -> None:
    first = registry.register(trained("linucb", 0), evidence(0.70))
    with pytest.raises(RegistryError, match="no baseline estimate"):
        registry.promote()
    assert registry.promote(force=True, by="tester").startswith("forced by tester; gate skipped")
    assert registry.version_of(CHAMPION) == first
    (forced,) = registry.describe(first).history
    assert forced.action == "forced" and "no baseline recorded" in forced.reason

    champion_baseline = Baseline("champion tip-policy/1 (linucb)", evidence(0.70), first)
    weak = registry.register(trained("egreedy", 1), evidence(0.71), baseline=champion_baseline)
    with pytest.raises(RegistryError, match=r"lower bound 0.6900 does not beat 0.7000"):
        registry.promote()
    assert registry.version_of(CHAMPION) == first

    strong = registry.register(trained("squarecb", 2), evidence(0.80), baseline=champion_baseline)
    reason = registry.promote()
    assert "lower bound 0.7800 beats 0.7000, the estimate of champion tip-policy/1" in reason
    assert registry.version_of(CHAMPION) == strong
    assert registry.tags_of(strong)["previous_champion"] == first

    assert "rolled back from version" in registry.rollback()
    assert registry.version_of(CHAMPION) == first
    actions = [e.action for e in registry.describe(first).history]
    assert actions == ["forced", "replaced", "rolled back to"]
    assert [e.action for e in registry.describe(strong).history] == [
        "promoted",
        "rolled back from",
    ]

    registry.client.set_registered_model_alias("tip-policy", CHALLENGER, weak)
    assert registry.promote(force=True).startswith("forced")
    assert registry.version_of(CHAMPION) == weak


def test_evidence_against_a_champion_that_has_moved_since_is_refused(
    registry: PolicyRegistry,
) -> None:
    # Judged against the served policy while there was no champion ...
    judged = registry.register(trained("linucb", 0), evidence(0.9), baseline=served_baseline(0.5))
    # ... but someone made another version champion before it was promoted.
    other = registry.register(trained("egreedy", 1), evidence(0.6))
    registry.promote(force=True)
    registry.client.set_registered_model_alias("tip-policy", CHALLENGER, judged)
    with pytest.raises(RegistryError, match=f"the champion is now version {other}"):
        registry.promote()
    assert registry.version_of(CHAMPION) == other


def test_nothing_to_promote_or_roll_back(registry: PolicyRegistry) -> None:
    with pytest.raises(RegistryError, match="no challenger"):
        registry.promote()
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback()
    with pytest.raises(RegistryError, match="does not exist"):
        registry.describe("@champion")
    registry.register(trained("linucb", 0), evidence(0.5), baseline=served_baseline(0.3))
    registry.promote()
    with pytest.raises(RegistryError, match="already the champion"):
        registry.promote()
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()
    with pytest.raises(RegistryError, match="no version '7'"):
        registry.describe("7")


def test_versions_record_their_evidence_and_lineage(registry: PolicyRegistry) -> None:
    lineage = Lineage(
        source="decision log postgresql://tipgraph:***@db:5432/tipgraph",
        n_events=5000,
        trained_through_reward_id=4321,
        filters={"since": "2026-11-01T00:00:00+00:00", "prompt_version": "v3"},
        sweep_run_id="abc123",
    )
    version = registry.register(
        trained("linucb", 0),
        evidence(0.8),
        baseline=served_baseline(0.75),
        lineage=lineage,
        hyperparameters={"kind": "linucb", "alpha": "0.4", "ridge": "2"},
    )
    record = registry.describe(version)
    assert record.lineage == lineage
    assert record.hyperparameters == {"kind": "linucb", "alpha": "0.4", "ridge": "2"}
    assert record.baseline == served_baseline(0.75)
    assert record.aliases == (CHALLENGER,) and record.passes_gate is True
    assert registry.load(version).trained_through_reward_id == 4321
    assert [r.version for r in registry.versions()] == [version]
    json.dumps(record.to_dict())  # the CLI's --format json


def _cli(tracking_uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command in its own process, as an operator's terminal sees it."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MLFLOW_", "TIPGRAPH_"))
    }
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    return subprocess.run(
        [sys.executable, "-m", "tipgraph_ops.cli", "--config", CONFIG, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def test_promote_rollback_and_registry_commands_print_only_their_own_lines(
    registry: PolicyRegistry, tmp_path: Path
) -> None:
    uri = registry.tracking_uri
    missing = _cli(f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}", "registry", "list")
    assert missing.returncode == 1 and "no model registry at" in missing.stderr
    assert not (tmp_path / "none").exists()

    short = registry.register(
        trained("linucb", 0),
        OffPolicyEvidence("progressive dr", 0.7974, 0.7583, 0.8415, 5000),
        baseline=served_baseline(0.7714),
        lineage=Lineage("simulator (300 events, seed 4, logged by egreedy)", 300),
        hyperparameters={"kind": "linucb", "alpha": "0.5"},
    )
    refused = _cli(uri, "promote", "--who", "alice")
    assert refused.returncode == 1 and refused.stdout == ""
    (line,) = refused.stderr.splitlines()  # the error, and nothing else
    assert line.startswith("tipgraph: promote refused: challenger version 1 lower bound 0.7583")
    assert "0.7714, the estimate of served policy linucb (linucb)" in line

    forced = _cli(uri, "promote", "--force", "--who", "alice")
    assert forced.returncode == 0 and forced.stderr == "", forced.stderr
    assert forced.stdout.startswith(f"tip-policy@champion -> version {short}: forced by")

    listed = _cli(uri, "registry", "list")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    (row,) = [r for r in listed.stdout.splitlines() if r.strip().startswith(f"{short} ")]
    for cell in ("@challenger,@champion", "linucb", "0.7583", "0.7714", "fails", "300"):
        assert cell in row, row

    shown = _cli(uri, "registry", "show", "@champion")
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    for text in (
        "kind              linucb",
        "hyperparameters   alpha=0.5",
        "progressive dr: 0.7974 [0.7583, 0.8415] on 5000 events",
        "baseline          served policy linucb (linucb): 0.7714",
        "fails: lower bound 0.7583 does not beat the baseline's estimate 0.7714",
        "tuned on          simulator (300 events",
        "forced by tipgraph promote (alice): gate skipped",
    ):
        assert text in shown.stdout, shown.stdout
    as_json = json.loads(_cli(uri, "registry", "show", short, "--format", "json").stdout)
    assert as_json["aliases"] == [CHALLENGER, CHAMPION]
    assert as_json["history"][0]["action"] == "forced"

    better = registry.register(
        trained("squarecb", 1),
        evidence(0.85),
        baseline=Baseline("champion tip-policy/1 (linucb)", evidence(0.80), short),
    )
    promoted = _cli(uri, "promote", "--who", "bob")
    assert promoted.returncode == 0 and promoted.stderr == "", promoted.stderr
    assert f"-> version {better}: challenger version {better} lower bound 0.8300 beats" in (
        promoted.stdout
    )
    rolled = _cli(uri, "rollback", "--who", "bob")
    assert rolled.returncode == 0 and rolled.stderr == "", rolled.stderr
    assert rolled.stdout.strip() == (
        f"tip-policy@champion -> version {short}: rolled back from version {better} by "
        "tipgraph rollback (bob)"
    )
    assert registry.version_of(CHAMPION) == short

    unknown = _cli(uri, "registry", "show", "99")
    assert unknown.returncode == 1 and unknown.stderr.startswith("tipgraph: error: ")
    assert "Traceback" not in unknown.stderr
