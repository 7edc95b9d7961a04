"""The compiled progressive replay against the reference loop serving runs.

tipgraph/compiled_replay.py is a second implementation of four policies' decide-and-learn
loop; these tests pin it to ``Policy.replay(..., reference=True)`` on random logs."""

from __future__ import annotations

import numpy as np
import pytest

from tipgraph.compiled_replay import KIND_CODES
from tipgraph.policies import Policy, PolicyInputError, make_policy
from tipgraph.settings import parse_policy

DIM = 12


def random_log(seed: int, n_events: int = 600, dim: int = DIM) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, n_events)  # 1 to 8 candidates, single-candidate events too
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    X = rng.normal(size=(offsets[-1], dim))
    X[rng.uniform(size=X.shape) < 0.3] = 0.0  # sparse columns, as the joint features are
    X[::7] = X[::7].round(1)  # repeated values within a vector
    # A candidate repeated within every third event that has two: scores that tie exactly,
    # where a rounding difference between the loops could move the mass by a whole share.
    for start, size in zip(offsets[:-1:3], sizes[::3], strict=True):
        if size > 1:
            X[start + 1] = X[start]
    rows = offsets[:-1] + rng.integers(0, sizes)
    rewards = rng.uniform(size=n_events).round(2)
    return X, offsets, rows, rewards


SETTINGS = [
    {"kind": "linucb", "alpha": 0.7, "ridge": 0.5, "epsilon": 0.05},
    {"kind": "linucb", "alpha": 0.0, "epsilon": 0.0, "refresh_every": 64},
    {"kind": "egreedy", "epsilon": 0.2, "refresh_every": 100},
    {"kind": "egreedy", "epsilon": 0.0},
    {"kind": "softmax", "temperature": 0.1, "epsilon": 0.01},
    {"kind": "squarecb", "gamma": 50.0, "epsilon": 0.0},
    {"kind": "squarecb", "gamma": 5.0, "features": None, "refresh_every": 1},
]


def policy_of(settings: dict[str, object], dim: int = DIM) -> Policy:  # type: ignore[type-arg]
    return make_policy(parse_policy({"name": "p", **settings}), dim)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s['kind']}")
def test_the_compiled_loop_gives_the_reference_probabilities_and_state(
    settings: dict[str, object], seed: int
) -> None:
    X, offsets, rows, rewards = random_log(seed)
    ids = [f"e{i}" for i in range(len(rows))]
    compiled, reference = policy_of(settings), policy_of(settings)
    # Half the log in each: the second call starts from a learned state mid-refresh.
    half = len(rows) // 2
    cut = offsets[half]
    first = (X[:cut], offsets[: half + 1], rows[:half], rewards[:half], ids[:half])
    second = (X[cut:], offsets[half:] - cut, rows[half:] - cut, rewards[half:], ids[half:])
    for part in (first, second):
        pi = compiled.replay(*part)
        pi_ref = reference.replay(*part, reference=True)
        np.testing.assert_allclose(pi, pi_ref, rtol=0, atol=1e-12)
    assert compiled.n_updates == reference.n_updates == len(rows)
    for name in ("gram_", "A_inv_", "b_"):
        np.testing.assert_allclose(
            getattr(compiled.stats_, name), getattr(reference.stats_, name), rtol=1e-9, atol=1e-12
        )
    # And it goes on deciding as the reference does.
    block = X[: offsets[3]]
    np.testing.assert_allclose(
        compiled.distribution(block), reference.distribution(block), atol=1e-12
    )


def test_the_compiled_loop_covers_the_ridge_kinds_only() -> None:
    assert set(KIND_CODES) == {"linucb", "egreedy", "softmax", "squarecb"}
    X, offsets, rows, rewards = random_log(5, n_events=50)
    ids = [f"e{i}" for i in range(len(rows))]
    # Forgetting and sampling policies take the reference loop: still equal, trivially.
    for settings in ({"kind": "linucb", "half_life_s": 60.0}, {"kind": "lints"}):
        a, b = policy_of(settings), policy_of(settings)
        times = np.arange(len(rows), dtype=np.float64)
        np.testing.assert_array_equal(
            a.replay(X, offsets, rows, rewards, ids, times),
            b.replay(X, offsets, rows, rewards, ids, times, reference=True),
        )


def test_a_feature_subset_is_applied_before_the_compiled_loop() -> None:
    from tipgraph.features import FEATURE_SPEC

    X, offsets, rows, rewards = random_log(7, n_events=200, dim=FEATURE_SPEC.dim)
    ids = [f"e{i}" for i in range(len(rows))]
    settings = {"kind": "linucb", "features": ["kind", "history", "task"]}
    a, b = policy_of(settings, FEATURE_SPEC.dim), policy_of(settings, FEATURE_SPEC.dim)
    np.testing.assert_allclose(
        a.replay(X, offsets, rows, rewards, ids),
        b.replay(X, offsets, rows, rewards, ids, reference=True),
        atol=1e-12,
    )
    dropped = FEATURE_SPEC.mask(["kind", "history", "task"]) == 0
    assert not a.stats_.gram_[dropped].any()


def test_bad_logs_are_refused_before_the_compiled_loop() -> None:
    policy = policy_of({"kind": "linucb"})
    X = np.ones((4, DIM))
    with pytest.raises(PolicyInputError, match="inside its own event"):
        policy.replay(X, np.array([0, 2, 4]), np.array([2, 3]), np.array([1.0, 0.0]), ["a", "b"])
    with pytest.raises(PolicyInputError, match="NaN"):
        policy.replay(X, np.array([0, 4]), np.array([0]), np.array([np.nan]), ["a"])
    assert policy.n_updates == 0
