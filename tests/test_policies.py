"""Invariants every policy must keep, checked across all of them at once."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydantic import ValidationError

from tipgraph.policies import (
    FORMAT_MAGIC,
    POLICY_CLASSES,
    LinUCB,
    Policy,
    PolicyInputError,
    PolicyStateError,
    SquareCB,
    make_policy,
    policy_from_bytes,
)
from tipgraph.settings import (
    LinUCBSettings,
    SquareCBSettings,
    UniformSettings,
    parse_policy,
    policy_fields,
)

DIM = 6
KINDS = sorted(POLICY_CLASSES)
LEARNERS = ["linucb", "lints", "egreedy", "softmax", "squarecb"]


def make(kind: str, **params: float) -> Policy:
    """A ``kind`` policy with those of ``params`` it has (uniform has no epsilon)."""
    own = {k: v for k, v in params.items() if k in policy_fields(kind)}
    return make_policy(
        parse_policy(dict(name=f"p_{kind}", kind=kind, **own)), DIM, spec_version="spec-a"
    )


def trained(kind: str, n: int = 200, seed: int = 0, **params: float) -> Policy:
    rng = np.random.default_rng(seed)
    policy = make(kind, **params)
    for _ in range(n):
        policy.update(rng.normal(size=DIM), float(rng.uniform()))
    return policy


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(
    X=arrays(np.float64, st.tuples(st.integers(1, 40), st.just(DIM)), elements=finite),
    epsilon=st.floats(0.0, 1.0),
    event=st.text(max_size=12),
)
def test_probabilities_are_valid_for_any_input(
    kind: str, X: np.ndarray, epsilon: float, event: str
) -> None:
    policy = trained(kind, n=20, epsilon=epsilon)
    decision = policy.decide(X, event)
    p = decision.probabilities
    assert p.shape == (len(X),)
    assert np.all(p >= 0)
    assert p.sum() == pytest.approx(1.0)
    assert 0 <= decision.chosen < len(X) and p[decision.chosen] > 0
    if kind != "uniform":  # the documented exploration floor
        assert p.min() >= epsilon / len(X) - 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_same_event_replays_the_same_decision(kind: str) -> None:
    X = np.random.default_rng(1).normal(size=(10, DIM))
    a, b = trained(kind, epsilon=0.3), trained(kind, epsilon=0.3)
    picks = [a.decide(X, f"event-{i}") for i in range(60)]
    again = [b.decide(X, f"event-{i}") for i in range(60)]
    assert [d.chosen for d in picks] == [d.chosen for d in again]
    assert all(
        np.array_equal(x.probabilities, y.probabilities) for x, y in zip(picks, again, strict=True)
    )
    assert len({d.chosen for d in picks}) > 1  # the seed really varies with the event


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_training_on_the_union(kind: str) -> None:
    rng = np.random.default_rng(2)
    data = [(rng.normal(size=DIM), float(rng.uniform())) for _ in range(300)]
    a, b, union = make(kind), make(kind), make(kind)
    for i, (x, r) in enumerate(data):
        (a if i % 3 else b).update(x, r)
        union.update(x, r)
    a.merge(b)
    assert a.n_updates == union.n_updates == 300
    np.testing.assert_allclose(a.stats_.gram_, union.stats_.gram_, atol=1e-9)
    np.testing.assert_allclose(a.stats_.b_, union.stats_.b_, atol=1e-9)
    X = rng.normal(size=(8, DIM))
    np.testing.assert_allclose(a.distribution(X, "e"), union.distribution(X, "e"), atol=1e-6)


def test_merge_refuses_other_features() -> None:
    other = make_policy(LinUCBSettings(name="x"), DIM, spec_version="spec-b")
    with pytest.raises(PolicyStateError, match="features spec-b"):
        make("linucb").merge(other)


@pytest.mark.parametrize("refresh_every", [1_000_000, 1024])
def test_sherman_morrison_inverse_matches_numpy_after_10000_updates(refresh_every: int) -> None:
    policy = trained("linucb", n=10_000, seed=3, ridge=0.5, refresh_every=refresh_every)
    np.testing.assert_allclose(policy.stats_.A_inv_, np.linalg.inv(policy.stats_.A), atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_state_round_trips_through_bytes(kind: str) -> None:
    policy = trained(kind, epsilon=0.2)
    loaded = policy_from_bytes(policy.to_bytes(), expected_spec_version="spec-a")
    assert type(loaded) is type(policy) and loaded.settings == policy.settings
    assert loaded.n_updates == policy.n_updates and loaded.version == policy.version
    X = np.random.default_rng(4).normal(size=(7, DIM))
    np.testing.assert_allclose(loaded.distribution(X, "e"), policy.distribution(X, "e"), atol=1e-9)


def test_loading_refuses_other_features_and_garbage() -> None:
    data = trained("linucb").to_bytes()
    with pytest.raises(PolicyStateError, match=r"learned on features spec-a.*uses spec-z"):
        policy_from_bytes(data, expected_spec_version="spec-z")
    with pytest.raises(PolicyStateError, match="bad magic"):
        policy_from_bytes(b"pickle?")
    with pytest.raises(PolicyStateError, match="values, expected"):
        policy_from_bytes(data[:-8])


@pytest.mark.parametrize("kind", LEARNERS)
def test_each_learning_policy_learns_a_simple_problem(kind: str) -> None:
    rng = np.random.default_rng(5)
    theta = np.array([1.0, -1.0, 0.5, 0.0, 0.0, 0.0])
    policy = make(kind, epsilon=0.05, alpha=0.3, temperature=0.05, gamma=100.0, v=0.1)
    gained, best, average = [], [], []
    for i in range(3000):
        X = rng.normal(size=(5, DIM))
        expected = X @ theta
        d = policy.decide(X, f"e{i}")
        policy.update(X[d.chosen], float(expected[d.chosen] + rng.normal(scale=0.1)))
        if i >= 2000:
            gained.append(expected[d.chosen])
            best.append(expected.max())
            average.append(expected.mean())
    assert np.mean(gained) > 0.85 * np.mean(best)
    assert abs(np.mean(average)) < 0.1 < np.mean(best)


def test_uniform_and_baseline_do_not_use_what_they_learn() -> None:
    X = np.random.default_rng(6).normal(size=(4, DIM))
    np.testing.assert_allclose(trained("uniform").distribution(X), [0.25] * 4)
    base = trained("baseline", epsilon=0.2).distribution(X)
    np.testing.assert_allclose(base, [0.85, 0.05, 0.05, 0.05])


def test_linucb_prefers_the_uncertain_direction() -> None:
    policy = LinUCB(LinUCBSettings(name="p", alpha=1.0), 2)
    for _ in range(50):
        policy.update([1.0, 0.0], 0.5)
    scores = policy.scores([[1.0, 0.0], [0.0, 1.0]])
    assert scores[1] > scores[0]


def test_squarecb_matches_its_closed_form() -> None:
    policy = SquareCB(SquareCBSettings(name="p", gamma=10.0, epsilon=0.0), 2)
    policy.stats_.add(np.eye(2) * 1e9, np.array([0.5e9, 0.2e9]), 1)  # θ ≈ (0.5, 0.2)
    X = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    p = policy.distribution(X)
    yhat = np.array([0.5, 0.2, 0.0])
    expected_others = 1 / (3 + 10 * (0.5 - yhat[1:]))
    np.testing.assert_allclose(p[1:], expected_others, rtol=1e-6)
    assert p[0] == pytest.approx(1 - expected_others.sum())


def test_thompson_probabilities_follow_the_posterior() -> None:
    policy = make("lints", v=1.0, ts_draws=4000, epsilon=0.0)
    X = np.array([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0]])
    np.testing.assert_allclose(policy.distribution(X, "e"), [0.5, 0.5], atol=0.05)
    for _ in range(500):
        policy.update(X[0], 1.0)
        policy.update(X[1], 0.0)
    assert policy.distribution(X, "e")[0] > 0.99


@pytest.mark.parametrize(
    ("X", "match"),
    [
        (np.ones((3, DIM + 1)), "shape"),
        (np.ones(DIM), "shape"),
        (np.ones((0, DIM)), "shape"),
        (np.full((2, DIM), np.nan), "NaN or infinite"),
        (np.full((2, DIM), np.inf), "NaN or infinite"),
    ],
)
def test_bad_inputs_are_rejected_at_the_boundary(X: np.ndarray, match: str) -> None:
    with pytest.raises(PolicyInputError, match=match):
        make("linucb").distribution(X)


def test_update_rejects_bad_reward_and_vector() -> None:
    policy = make("linucb")
    with pytest.raises(PolicyInputError, match="reward must be finite"):
        policy.update(np.ones(DIM), float("nan"))
    with pytest.raises(PolicyInputError, match="shape"):
        policy.update(np.ones(DIM + 1), 1.0)


def test_version_changes_with_updates_and_hyperparameters() -> None:
    a, b = make("linucb", alpha=0.5), make("linucb", alpha=1.0)
    assert a.version != b.version
    before = a.version
    a.update(np.ones(DIM), 1.0)
    assert a.version != before and a.version.endswith(".1")


# Every kind's hyperparameters with their defaults: the one bag format-1 states stored.
FORMAT_1_BAG = {
    "ridge": 1.0,
    "epsilon": 0.05,
    "alpha": 1.0,
    "v": 0.3,
    "ts_draws": 128,
    "temperature": 0.1,
    "gamma": 300.0,
    "refresh_every": 1024,
    "features": None,
}


def as_format_1(policy: Policy, **bag: object) -> bytes:
    """``policy``'s state as the code before per-kind settings wrote it."""
    data = policy.to_bytes()
    offset = len(FORMAT_MAGIC) + 4
    (length,) = struct.unpack("<I", data[len(FORMAT_MAGIC) : offset])
    header = json.loads(data[offset : offset + length])
    settings = {**FORMAT_1_BAG, **header["settings"], **bag}
    old = json.dumps({**header, "format": 1, "settings": settings}, sort_keys=True).encode()
    return FORMAT_MAGIC + struct.pack("<I", len(old)) + old + data[offset + length :]


@pytest.mark.parametrize("kind", KINDS)
def test_format_1_states_load_with_the_kinds_own_settings(kind: str) -> None:
    policy = trained(kind, epsilon=0.2)
    loaded = policy_from_bytes(as_format_1(policy), expected_spec_version="spec-a")
    assert type(loaded) is type(policy) and loaded.settings == policy.settings
    assert loaded.version == policy.version and loaded.n_updates == policy.n_updates
    X = np.random.default_rng(5).normal(size=(6, DIM))
    # A loaded state inverts A exactly; the trained one by Sherman–Morrison steps.
    np.testing.assert_allclose(loaded.distribution(X, "e"), policy.distribution(X, "e"), atol=1e-9)


def test_a_hyperparameter_the_kind_never_reads_is_not_part_of_its_version() -> None:
    policy = trained("linucb")
    hot, cold = (
        policy_from_bytes(as_format_1(policy, temperature=t, gamma=g))
        for t, g in ((5.0, 1), (0.01, 9))
    )
    assert hot.version == cold.version == policy.version
    assert policy_from_bytes(as_format_1(policy, alpha=3.0)).version != policy.version


def test_a_kind_refuses_another_kinds_hyperparameter() -> None:
    with pytest.raises(ValidationError, match=r"linucb\.temperature\s+Extra inputs"):
        parse_policy({"name": "p", "kind": "linucb", "temperature": 0.5})
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        parse_policy({"name": "p", "kind": "thompson"})
    future = make("uniform").to_bytes().replace(b'"format": 2', b'"format": 3')
    with pytest.raises(PolicyStateError, match="unsupported policy state format 3"):
        policy_from_bytes(future)


def test_settings_and_class_must_agree() -> None:
    with pytest.raises(ValueError, match="needs kind 'linucb'"):
        LinUCB(UniformSettings(name="p"), DIM)


def test_from_bytes_on_a_class_checks_the_kind() -> None:
    data = trained("squarecb").to_bytes()
    assert isinstance(Policy.from_bytes(data), SquareCB)
    assert isinstance(SquareCB.from_bytes(data, expected_spec_version="spec-a"), SquareCB)
    with pytest.raises(PolicyStateError, match="holds a 'squarecb' policy, not 'linucb'"):
        LinUCB.from_bytes(data)


def test_feature_groups_cover_every_feature_exactly_once() -> None:
    from tipgraph.features import FEATURE_GROUPS, FEATURE_SPEC

    names = [name for group in FEATURE_GROUPS.values() for name in group]
    assert sorted(names) == sorted(FEATURE_SPEC.context + FEATURE_SPEC.candidate)
    np.testing.assert_array_equal(FEATURE_SPEC.mask(list(FEATURE_GROUPS)), 1.0)
    history = FEATURE_SPEC.mask(["history"])
    assert history.sum() == 3 and history[-len(FEATURE_SPEC.candidate) :][:3].all()


@pytest.mark.parametrize("kind", ["linucb", "lints", "squarecb"])
def test_a_feature_subset_is_the_same_policy_on_zeroed_columns(kind: str) -> None:
    from tipgraph.features import FEATURE_SPEC

    rng = np.random.default_rng(4)
    d = FEATURE_SPEC.dim
    subset = parse_policy(dict(name=kind, kind=kind, features=("task", "kind")))
    full = parse_policy(dict(name=kind, kind=kind))
    restricted, manual = make_policy(subset, d), make_policy(full, d)
    mask = FEATURE_SPEC.mask(["kind", "task"])
    for _ in range(100):
        x, r = rng.normal(size=d), float(rng.random())
        restricted.update(x, r)
        manual.update(x * mask, r)
    X = rng.normal(size=(6, d))
    np.testing.assert_allclose(restricted.distribution(X, "e"), manual.distribution(X * mask, "e"))
    assert restricted.settings.features == ("kind", "task")  # one spelling per subset
    assert restricted.version != manual.version
    # The subset survives serialisation (up to Sherman–Morrison vs exact inverse rounding).
    loaded = policy_from_bytes(restricted.to_bytes())
    assert loaded.settings.features == ("kind", "task")
    np.testing.assert_allclose(loaded.distribution(X, "e"), restricted.distribution(X, "e"))


def test_a_feature_subset_needs_tipgraph_features() -> None:
    with pytest.raises(ValueError, match="feature layout"):
        make_policy(LinUCBSettings(name="linucb", features=("time",)), 5)
    with pytest.raises(ValueError, match="at least one group"):
        LinUCBSettings(name="linucb", features=())


@pytest.mark.parametrize("kind", KINDS)
def test_replay_equals_asking_then_learning_event_by_event(kind: str) -> None:
    rng = np.random.default_rng(7)
    d, sizes = DIM, rng.integers(1, 6, size=40)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    X = rng.normal(size=(offsets[-1], d))
    rows = offsets[:-1] + rng.integers(0, sizes)
    rewards = rng.random(40)
    ids = [f"e{i}" for i in range(40)]
    replayed, stepped = make(kind), make(kind)
    # The reference loop, bit for bit; the compiled one is pinned to it within 1e-12
    # (tests/test_compiled_replay.py).
    pi = replayed.replay(X, offsets, rows, rewards, ids, reference=True)
    for i in range(40):
        lo, hi = offsets[i], offsets[i + 1]
        np.testing.assert_array_equal(pi[lo:hi], stepped.distribution(X[lo:hi], ids[i]))
        stepped.update(X[rows[i]], rewards[i])
    assert replayed.n_updates == stepped.n_updates == 40
    np.testing.assert_array_equal(replayed.stats_.b_, stepped.stats_.b_)


def test_replay_checks_its_log_once() -> None:
    policy, X = make("linucb"), np.ones((4, DIM))
    with pytest.raises(PolicyInputError, match="offsets"):
        policy.replay(X, np.array([0, 3]), np.array([0]), np.array([1.0]), ["a"])
    with pytest.raises(PolicyInputError, match="inside its own event"):
        policy.replay(X, np.array([0, 2, 4]), np.array([2, 3]), np.array([1.0, 0.0]), ["a", "b"])
    with pytest.raises(PolicyInputError, match="NaN"):
        policy.replay(X, np.array([0, 4]), np.array([0]), np.array([np.nan]), ["a"])
    with pytest.raises(PolicyInputError, match="2 entries"):
        policy.replay(X, np.array([0, 2, 4]), np.array([0, 2]), np.array([1.0]), ["a", "b"])


# -- forgetting (half_life_s): forward decay, exact across replicas -----------------------------
HALF_LIFE = 3600.0
T_START = 1.78e9  # 2026, in Unix seconds: weights 2^(t/h) far beyond float range


def forgetting(kind: str = "linucb", **params: float) -> Policy:
    return make(kind, half_life_s=HALF_LIFE, **params)


rewards_in_time = st.lists(
    st.tuples(
        arrays(np.float64, DIM, elements=st.floats(-10, 10, allow_nan=False)),
        st.floats(0.0, 1.0),
        st.floats(0.0, 200 * HALF_LIFE),  # offsets from T_START, in any order
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(data=rewards_in_time, order=st.randoms(use_true_random=False), split=st.integers(1, 5))
def test_forgetting_is_the_same_in_any_order_split_or_saved_and_reloaded(
    data: list[tuple[np.ndarray, float, float]], order: Any, split: int
) -> None:
    in_time = forgetting()
    for x, r, dt in sorted(data, key=lambda item: item[2]):
        in_time.update(x, r, T_START + dt)
    # Another replica: a random order, part learned directly, part merged from a peer
    # that was saved and loaded on the way (a registered champion).
    shuffled = list(data)
    order.shuffle(shuffled)
    mine, peer = forgetting(), forgetting()
    for i, (x, r, dt) in enumerate(shuffled):
        (peer if i % split == 0 else mine).update(x, r, T_START + dt)
    mine.merge(policy_from_bytes(peer.to_bytes()))
    assert mine.n_updates == in_time.n_updates == len(data)
    assert mine.stats_.latest_ == in_time.stats_.latest_
    scale = 1.0 + float(np.abs(in_time.stats_.gram_).max())
    np.testing.assert_allclose(
        mine.stats_.gram_, in_time.stats_.gram_, rtol=1e-9, atol=1e-12 * scale
    )
    np.testing.assert_allclose(mine.stats_.b_, in_time.stats_.b_, rtol=1e-9, atol=1e-12 * scale)


def test_a_reward_counts_half_for_every_half_life_it_is_older_than_the_newest() -> None:
    rng = np.random.default_rng(4)
    data = [
        (rng.normal(size=DIM), float(rng.uniform()), T_START + k * HALF_LIFE / 4) for k in range(30)
    ]
    policy = forgetting()
    for x, r, t in data:
        policy.update(x, r, t)
    newest = max(t for _, _, t in data)
    weights = [2.0 ** (-(newest - t) / HALF_LIFE) for _, _, t in data]
    gram = sum(w * np.outer(x, x) for w, (x, _, _) in zip(weights, data, strict=True))
    b = sum(w * r * x for w, (x, r, _) in zip(weights, data, strict=True))
    np.testing.assert_allclose(policy.stats_.gram_, gram, rtol=1e-12)
    np.testing.assert_allclose(policy.stats_.b_, b, rtol=1e-12)
    theta = np.linalg.solve(gram + np.eye(DIM), b)
    np.testing.assert_allclose(policy.stats_.theta, theta, rtol=1e-9)


def test_forgetting_runs_for_ever_without_overflow_and_drops_the_distant_past() -> None:
    rng = np.random.default_rng(5)
    policy = forgetting()
    x_old = rng.normal(size=DIM)
    policy.update(x_old, 1.0, T_START)
    for k in range(1, 400):  # 100,000 half-lives: 2^(t/h) alone would overflow long before
        policy.update(rng.normal(size=DIM), 0.0, T_START + k * 250 * HALF_LIFE)
    assert np.isfinite(policy.stats_.gram_).all() and np.isfinite(policy.stats_.A_inv_).all()
    # The first reward (the only one with reward 1) weighs 2^-99,750: gone.
    assert not policy.stats_.b_.any()


def test_forgetting_needs_each_rewards_time_and_merges_only_with_its_own_kind() -> None:
    policy = forgetting()
    with pytest.raises(PolicyInputError, match="needs each reward's time"):
        policy.update(np.ones(DIM), 1.0)
    with pytest.raises(PolicyStateError, match="forgetting state with one that keeps all"):
        policy.merge(make("linucb"))
    with pytest.raises(PolicyStateError, match="half-lives"):
        policy.merge(make("linucb", half_life_s=2 * HALF_LIFE))
    with pytest.raises(ValidationError, match="half_life_s"):
        make("linucb", half_life_s=0.0)
    # Without forgetting, a time changes nothing.
    keeps, timed = make("linucb"), make("linucb")
    keeps.update(np.ones(DIM), 1.0)
    timed.update(np.ones(DIM), 1.0, T_START)
    assert keeps.to_bytes() == timed.to_bytes()


@pytest.mark.parametrize("kind", LEARNERS)
def test_every_learner_can_forget_and_replay_with_times(kind: str) -> None:
    rng = np.random.default_rng(6)
    policy = forgetting(kind)
    X = rng.normal(size=(12, DIM))
    offsets = np.array([0, 3, 6, 9, 12])
    rows = np.array([0, 4, 8, 9])
    rewards = np.array([1.0, 0.0, 0.5, 1.0])
    times = T_START + np.array([0.0, 1.0, 2.0, 3.0]) * HALF_LIFE
    pi = policy.replay(X, offsets, rows, rewards, ["a", "b", "c", "d"], times)
    assert pi.shape == (12,) and np.allclose(np.add.reduceat(pi, offsets[:-1]), 1.0)
    step = forgetting(kind)
    for row, r, t in zip(rows, rewards, times, strict=True):
        step.update(X[row], float(r), float(t))
    np.testing.assert_allclose(policy.stats_.b_, step.stats_.b_, rtol=1e-12)
    with pytest.raises(PolicyInputError, match="times need 4 finite entries"):
        forgetting(kind).replay(X, offsets, rows, rewards, ["a", "b", "c", "d"], times[:3])
