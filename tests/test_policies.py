from __future__ import annotations

import numpy as np
import pytest

from tipgraph.policies import (
    POLICY_CLASSES,
    EpsilonGreedy,
    LinUCB,
    PolicyInputError,
    make_policy,
)
from tipgraph.settings import PolicySettings

DIM = 6


def policy(kind: str, **params: float) -> object:
    return make_policy(PolicySettings(name=f"p_{kind}", kind=kind, **params), DIM)


@pytest.mark.parametrize("kind", sorted(POLICY_CLASSES))
def test_every_policy_gives_a_valid_distribution(kind: str) -> None:
    rng = np.random.default_rng(0)
    p = make_policy(PolicySettings(name="p", kind=kind, epsilon=0.1), DIM)
    for _ in range(20):
        X = rng.normal(size=(int(rng.integers(1, 30)), DIM)) * rng.uniform(0.1, 100)
        p.update(X[0], float(rng.uniform()))
        probs = p.distribution(X)
        assert probs.shape == (len(X),)
        assert np.all(probs >= 0)
        assert probs.sum() == pytest.approx(1.0)
        if kind != "uniform":
            assert probs.min() >= 0.1 / len(X) - 1e-12  # documented exploration floor


@pytest.mark.parametrize("kind", sorted(POLICY_CLASSES))
def test_same_event_replays_the_same_decision(kind: str) -> None:
    X = np.random.default_rng(1).normal(size=(10, DIM))
    a = make_policy(PolicySettings(name="p", kind=kind), DIM)
    b = make_policy(PolicySettings(name="p", kind=kind), DIM)
    picks = [a.decide(X, f"event-{i}").chosen for i in range(50)]
    assert picks == [b.decide(X, f"event-{i}").chosen for i in range(50)]
    assert len(set(picks)) > 1  # the seed really varies with the event


def test_sherman_morrison_inverse_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    p = LinUCB(PolicySettings(name="p", kind="linucb", ridge=0.5), DIM)
    for _ in range(10_000):
        p.update(rng.normal(size=DIM), float(rng.uniform()))
    np.testing.assert_allclose(p.stats_.A_inv_, np.linalg.inv(p.stats_.A_), atol=1e-9)


@pytest.mark.parametrize("kind", ["linucb", "egreedy"])
def test_learning_policies_find_the_better_arm(kind: str) -> None:
    rng = np.random.default_rng(3)
    theta = np.array([1.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    p = make_policy(PolicySettings(name="p", kind=kind, epsilon=0.05, alpha=0.2), DIM)
    rewards = []
    for i in range(3000):
        X = rng.normal(size=(5, DIM))
        d = p.decide(X, f"e{i}")
        reward = float(X[d.chosen] @ theta + rng.normal(scale=0.1))
        p.update(X[d.chosen], reward)
        rewards.append(reward)
    draws = [rng.normal(size=(5, DIM)) @ theta for _ in range(3000)]
    best_possible, uniform = np.mean([d.max() for d in draws]), np.mean([d.mean() for d in draws])
    assert np.mean(rewards[-500:]) > 0.8 * best_possible
    assert abs(uniform) < 0.1 < best_possible


def test_linucb_explores_the_uncertain_candidate() -> None:
    p = LinUCB(PolicySettings(name="p", kind="linucb", alpha=1.0, temperature=0.1), 2)
    for _ in range(50):
        p.update([1.0, 0.0], 0.5)
    scores = p.scores([[1.0, 0.0], [0.0, 1.0]])
    assert scores[1] > scores[0]  # never-seen direction gets the larger bonus


def test_egreedy_splits_ties() -> None:
    p = EpsilonGreedy(PolicySettings(name="p", kind="egreedy", epsilon=0.0), 2)
    np.testing.assert_allclose(p.distribution([[1, 0], [0, 1], [1, 1]]), [1 / 3] * 3)


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.ones((3, DIM + 1)), "shape"),
        (np.ones(DIM), "shape"),
        (np.ones((0, DIM)), "shape"),
        (np.full((2, DIM), np.nan), "NaN or infinite"),
    ],
)
def test_bad_inputs_are_rejected_at_the_boundary(X: np.ndarray, match: str) -> None:
    with pytest.raises(PolicyInputError, match=match):
        policy("linucb").distribution(X)  # type: ignore[attr-defined]


def test_update_rejects_bad_reward_and_vector() -> None:
    p = policy("linucb")
    with pytest.raises(PolicyInputError, match="reward must be finite"):
        p.update(np.ones(DIM), float("nan"))  # type: ignore[attr-defined]
    with pytest.raises(PolicyInputError, match="shape"):
        p.update(np.ones(DIM + 1), 1.0)  # type: ignore[attr-defined]


def test_version_changes_with_updates_and_hyperparameters() -> None:
    a, b = policy("linucb", alpha=0.5), policy("linucb", alpha=1.0)
    assert a.version != b.version  # type: ignore[attr-defined]
    before = a.version  # type: ignore[attr-defined]
    a.update(np.ones(DIM), 1.0)  # type: ignore[attr-defined]
    assert a.version != before and a.version.endswith(".1")  # type: ignore[attr-defined]
