"""The policy registry against a real MLflow tracking server backend (SQLite file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tipgraph.policies import make_policy
from tipgraph.settings import PolicySettings
from tuning.registry import (
    CHALLENGER,
    CHAMPION,
    OffPolicyEvidence,
    PolicyRegistry,
    RegistryError,
)

DIM = 5


def trained(kind: str, seed: int, spec: str = "spec-a"):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    policy = make_policy(PolicySettings(name="served", kind=kind), DIM, spec_version=spec)
    for _ in range(50):
        policy.update(rng.normal(size=DIM), float(rng.uniform()))
    return policy


def evidence(value: float, half_width: float = 0.02) -> OffPolicyEvidence:
    return OffPolicyEvidence("dr", value, value - half_width, value + half_width, 5000)


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

    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model(f"models:/tip-policy/{version}")
    np.testing.assert_allclose(pyfunc.predict(X), policy.distribution(X))


def test_a_state_for_other_features_is_refused(registry: PolicyRegistry) -> None:
    registry.register(trained("linucb", 0, spec="spec-old"), evidence(0.8))
    with pytest.raises(ValueError, match="learned on features spec-old"):
        registry.load("@challenger", expected_spec_version="spec-new")


def test_promotion_gate_rollback_and_force(registry: PolicyRegistry) -> None:
    first = registry.register(trained("linucb", 0), evidence(0.70))
    assert registry.promote() == "first champion"
    assert registry.version_of(CHAMPION) == first

    weak = registry.register(
        trained("egreedy", 1), evidence(0.71), champion_on_same_data=evidence(0.70)
    )
    with pytest.raises(RegistryError, match=r"lower bound 0.6900 does not beat .* 0.7000"):
        registry.promote()
    assert registry.version_of(CHAMPION) == first

    strong = registry.register(
        trained("squarecb", 2), evidence(0.80), champion_on_same_data=evidence(0.70)
    )
    reason = registry.promote()
    assert "lower bound 0.7800 > champion estimate 0.7000" in reason
    assert registry.version_of(CHAMPION) == strong
    assert registry.tags_of(strong)["previous_champion"] == first

    assert "rolled back from version" in registry.rollback()
    assert registry.version_of(CHAMPION) == first

    registry.client.set_registered_model_alias("tip-policy", CHALLENGER, weak)
    assert registry.promote(force=True).startswith("forced")
    assert registry.version_of(CHAMPION) == weak


def test_nothing_to_promote_or_roll_back(registry: PolicyRegistry) -> None:
    with pytest.raises(RegistryError, match="no challenger"):
        registry.promote()
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback()
    registry.register(trained("linucb", 0), evidence(0.5))
    registry.promote()
    with pytest.raises(RegistryError, match="already the champion"):
        registry.promote()
    with pytest.raises(RegistryError, match="no previous champion"):
        registry.rollback()


def test_promote_and_rollback_commands(
    registry: PolicyRegistry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tipgraph.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    config = str(Path(__file__).resolve().parent.parent / "configs" / "tipgraph.yaml")
    first = registry.register(trained("linucb", 0), evidence(0.7))
    assert main(["--config", config, "promote", "--who", "tester"]) == 0
    assert f"tip-policy@champion -> version {first}: first champion" in capsys.readouterr().out
    registry.register(trained("egreedy", 1), evidence(0.71), champion_on_same_data=evidence(0.70))
    assert main(["--config", config, "promote"]) == 1
    assert "does not beat" in capsys.readouterr().err
    assert main(["--config", config, "promote", "--force", "--who", "tester"]) == 0
    assert "forced by tipgraph promote (tester)" in capsys.readouterr().out
    assert main(["--config", config, "rollback"]) == 0
    assert registry.version_of(CHAMPION) == first
