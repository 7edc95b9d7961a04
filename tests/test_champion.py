"""Serving follows the registry (no Ray): a real SQLite decision log and MLflow backend."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from tests.test_sync import give_feedback, log_decision
from tipgraph.champion import ChampionFollower
from tipgraph.features import FEATURE_SPEC
from tipgraph.policies import make_policy
from tipgraph.registry import Lineage, OffPolicyEvidence, PolicyRegistry
from tipgraph.scoring import PolicyService
from tipgraph.settings import LinUCBSettings, SquareCBSettings, TipgraphSettings
from tipgraph.store import DecisionStore, open_store

T0 = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)
EVIDENCE = OffPolicyEvidence("dr", 0.8, 0.78, 0.82, 1000)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{tmp_path}/log.db"},
        registry={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "serve_alias": "champion"},
    )
    with open_store(settings.store) as store:
        yield settings, store, PolicyRegistry(settings.registry.tracking_uri)


def fresh_service() -> PolicyService:
    return PolicyService(
        make_policy(
            LinUCBSettings(name="linucb"),
            FEATURE_SPEC.dim,
            spec_version=FEATURE_SPEC.version,
        )
    )


def test_follower_swaps_in_the_champion_and_learns_only_newer_rewards(setup) -> None:  # type: ignore[no-untyped-def]
    settings, store, registry = setup
    store_: DecisionStore = store
    rng = np.random.default_rng(0)
    rewards = []
    for i in range(10):  # the log the tuned model was trained on
        x = rng.normal(size=FEATURE_SPEC.dim)
        log_decision(store_, f"old{i}", x, T0)
        rewards.append(give_feedback(store_, f"old{i}", 1.0, T0).reward_id)
    tuned = make_policy(
        SquareCBSettings(name="tuned"),
        FEATURE_SPEC.dim,
        spec_version=FEATURE_SPEC.version,
    )
    for event in store_.training_events():
        tuned.update(event.features, event.reward)
    registry.register(tuned, EVIDENCE, lineage=Lineage("decision log", len(rewards), max(rewards)))
    registry.promote(force=True)
    x = rng.normal(size=FEATURE_SPEC.dim)
    log_decision(store_, "new", x, T0)
    give_feedback(store_, "new", 0.5, T0)  # logged after the model was trained

    service = fresh_service()
    follower = ChampionFollower(settings, service, store_)
    assert follower.check() is True
    assert service.model_ref == "tip-policy/1"
    assert service.policy.kind == "squarecb"
    assert service.policy.n_updates == 11  # 10 from training + only the newer reward
    assert service.score(np.ones((3, FEATURE_SPEC.dim)), "e").policy_version.startswith(
        "tip-policy/1+squarecb-"
    )
    assert follower.check() is False  # nothing new
    assert service.sync(store_) == 0  # and nothing counted twice


def test_a_champion_for_other_features_is_refused_and_serving_continues(
    setup,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    settings, store, registry = setup
    registry.register(
        make_policy(LinUCBSettings(name="x"), FEATURE_SPEC.dim, spec_version="v0-old"),
        EVIDENCE,
    )
    registry.promote(force=True)
    service = fresh_service()
    before = service.policy
    with caplog.at_level(logging.ERROR):
        assert ChampionFollower(settings, service, store).check() is False
    assert service.policy is before and service.model_ref is None
    assert "refusing tip-policy/1" in caplog.text and "v0-old" in caplog.text
