"""Many replicas, one model: PolicyService instances sharing a store, no Ray."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from deployments.scoring import PolicyScorer
from tipgraph.features import EARLIER_LAYOUTS, FEATURE_SPEC, RECENCY_FEATURE, upgrade_from
from tipgraph.policies import make_policy
from tipgraph.scoring import PolicyService
from tipgraph.serve_config import policy_user_config
from tipgraph.settings import LinUCBSettings, StoreSettings, load_settings, parse_policy
from tipgraph.store import DecisionStore
from tipgraph.store.records import (
    CandidateRecord,
    DecisionRecord,
    FeedbackRecord,
    PolicyScoresRecord,
)

DIM = FEATURE_SPEC.dim
ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)


def replica(kind: str = "linucb", **extra: object) -> PolicyService:
    settings = parse_policy(dict(name="served", kind=kind, **extra))
    return PolicyService(make_policy(settings, DIM, spec_version=FEATURE_SPEC.version))


def log_decision(
    store: DecisionStore,
    event_id: str,
    x: np.ndarray,
    at: datetime,
    version: str = FEATURE_SPEC.version,
) -> None:
    candidate = CandidateRecord(
        event_id + "-c", 0, "focus", "tasks", "tip", None, None, None, x.tolist()
    )
    served = PolicyScoresRecord(
        "served", "v", "served", [0.0], [1.0], candidate.candidate_id, 1.0, 1.0
    )
    store.write_decisions(
        [
            DecisionRecord(
                event_id,
                "user",
                at,
                "served",
                "v",
                version,
                None,
                "tasks",
                candidate.candidate_id,
                "focus",
                1.0,
                {"total": 1.0},
                [candidate],
                served,
            )
        ]
    )


def give_feedback(
    store: DecisionStore, event_id: str, reward: float, at: datetime, wait_s: float = 3600.0
):  # type: ignore[no-untyped-def]
    return store.record_feedback(
        FeedbackRecord(event_id, "done", reward, reward, at, at), learn_within_s=wait_s
    )


def test_replicas_converge_to_the_model_trained_on_everything(store: DecisionStore) -> None:
    rng = np.random.default_rng(0)
    a, b = replica(), replica()
    truth = make_policy(LinUCBSettings(name="served"), DIM, spec_version=FEATURE_SPEC.version)
    for i in range(60):
        x, r = rng.normal(size=DIM), float(rng.uniform())
        log_decision(store, f"e{i}", x, T0)
        outcome = give_feedback(store, f"e{i}", r, T0 + timedelta(seconds=5))
        assert outcome.learned and outcome.reward_id is not None
        # The router sends each feedback to one replica, which learns it at once.
        (a if i % 3 else b).learn(outcome.reward_id, x, r, (T0 + timedelta(seconds=5)).timestamp())
        truth.update(x, r)
        if i == 30:
            a.sync(store)  # a sync halfway must not double count what a learned itself
    assert a.policy.n_updates != b.policy.n_updates  # diverged before syncing
    a.sync(store)
    b.sync(store)
    for service in (a, b):
        assert service.policy.n_updates == 60
        np.testing.assert_allclose(service.policy.stats_.gram_, truth.stats_.gram_, atol=1e-9)
        np.testing.assert_allclose(service.policy.stats_.b_, truth.stats_.b_, atol=1e-9)
    assert a.learned_directly + b.learned_directly == 60
    assert a.sync(store) == 0 and b.sync(store) == 0  # idempotent
    late = replica()  # a replica that starts now rebuilds everything from the log
    assert late.sync(store) == 60
    np.testing.assert_allclose(late.policy.stats_.b_, truth.stats_.b_, atol=1e-9)


def test_forgetting_replicas_hold_the_same_model_as_one_rebuilt_from_the_log(
    store: DecisionStore,
) -> None:
    """With half_life_s, each reward is weighed by its own logged time: replicas that learn
    different shares directly, in different orders, and one rebuilt from the log agree."""
    rng = np.random.default_rng(1)
    half_life = {"half_life_s": 3 * 3600.0}
    a, b = replica(**half_life), replica(**half_life)
    for i in range(60):
        x, r = rng.normal(size=DIM), float(rng.uniform())
        decided = T0 + timedelta(hours=i / 2)
        log_decision(store, f"e{i}", x, decided)
        answered = decided + timedelta(seconds=int(rng.integers(1, 600)))
        outcome = give_feedback(store, f"e{i}", r, answered)
        assert outcome.reward_id is not None
        # What a replica learns directly carries the same time the log holds.
        (a if i % 3 else b).learn(outcome.reward_id, x, r, answered.timestamp())
    a.sync(store)
    b.sync(store)
    late = replica(**half_life)
    assert late.sync(store) == 60
    for service in (a, b):
        np.testing.assert_allclose(service.policy.stats_.gram_, late.policy.stats_.gram_, rtol=1e-9)
        np.testing.assert_allclose(service.policy.stats_.b_, late.policy.stats_.b_, rtol=1e-9)
    # Forgetting changed the model: 30 hours of rewards at a 3-hour half-life.
    keeping = replica()
    keeping.sync(store)
    assert not np.allclose(late.policy.stats_.b_, keeping.policy.stats_.b_)
    X = rng.normal(size=(5, DIM))
    assert a.policy.distribution(X, "e").tolist() == late.policy.distribution(X, "e").tolist()


def test_a_forgetting_replica_leaves_a_reward_without_its_time_to_the_sync(
    store: DecisionStore,
) -> None:
    """An ingress of the previous release sends no time: the reward is not learned
    directly by a forgetting policy, and the sync applies it with the logged time."""
    service = replica(half_life_s=3600.0)
    log_decision(store, "e", np.ones(DIM), T0)
    outcome = give_feedback(store, "e", 1.0, T0 + timedelta(seconds=5))
    assert outcome.reward_id is not None
    assert service.learn(outcome.reward_id, np.ones(DIM), 1.0, None) is False
    assert service.sync(store) == 1
    assert service.policy.stats_.latest_ == (T0 + timedelta(seconds=5)).timestamp()
    keeping = replica()
    assert keeping.learn(outcome.reward_id, np.ones(DIM), 1.0, None) is True


def test_direct_learn_of_an_already_synced_reward_is_ignored(store: DecisionStore) -> None:
    service = replica()
    log_decision(store, "e", np.ones(DIM), T0)
    outcome = give_feedback(store, "e", 1.0, T0)
    assert outcome.reward_id is not None
    assert service.sync(store) == 1
    assert service.learn(outcome.reward_id, np.ones(DIM), 1.0, T0.timestamp()) is False
    assert service.policy.n_updates == 1


def test_rewards_logged_on_an_unknown_layout_are_skipped_not_fatal(store: DecisionStore) -> None:
    old_dim = DIM - 13  # the layout before the judge and embedding features
    log_decision(store, "old", np.ones(old_dim), T0)
    log_decision(store, "new", np.ones(DIM), T0 + timedelta(seconds=1))
    for event_id in ("old", "new"):
        assert give_feedback(store, event_id, 1.0, T0 + timedelta(seconds=2)).learned
    service = replica()
    assert service.sync(store) == 1
    assert service.policy.n_updates == 1 and service.skipped_other_layout == 1
    assert service.sync(store) == 0  # the watermark moved past it


def test_rewards_logged_on_the_previous_layout_are_learned_with_the_new_feature_at_0(
    store: DecisionStore,
) -> None:
    (earlier,) = EARLIER_LAYOUTS
    upgrade = upgrade_from(earlier.version)
    assert upgrade is not None
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=earlier.dim) for _ in range(5)]
    for i, x in enumerate(xs):
        log_decision(store, f"old{i}", x, T0)
        assert give_feedback(store, f"old{i}", 0.5, T0 + timedelta(seconds=2)).learned
    service, truth = replica(), replica()
    assert service.sync(store) == 5
    assert service.upgraded_from_earlier_layout == 5 and service.skipped_other_layout == 0
    for i, x in enumerate(xs):
        truth.learn(100 + i, upgrade.vector(x), 0.5, T0.timestamp())
    np.testing.assert_array_equal(service.policy.stats_.gram_, truth.policy.stats_.gram_)
    np.testing.assert_array_equal(service.policy.stats_.b_, truth.policy.stats_.b_)
    recency = FEATURE_SPEC.names.index(RECENCY_FEATURE)
    assert service.policy.stats_.gram_[recency].sum() == 0.0


def test_late_feedback_is_stored_but_not_learned_and_defaults_are(store: DecisionStore) -> None:
    service = replica()
    for event in ("quick", "late", "silent"):
        log_decision(store, event, np.ones(DIM), T0)
    assert give_feedback(store, "quick", 1.0, T0 + timedelta(seconds=30), wait_s=60).learned
    late = give_feedback(store, "late", 1.0, T0 + timedelta(seconds=61), wait_s=60)
    assert late.created and not late.learned and late.reward_id is None
    applied = store.apply_default_rewards(
        older_than=T0 + timedelta(seconds=1), reward=0.0, now=T0 + timedelta(seconds=70)
    )
    assert applied == 2  # "late" (its feedback came too late) and "silent"
    assert service.sync(store) == 3
    assert service.policy.stats_.b_.sum() == pytest.approx(DIM * 1.0)  # only "quick" paid 1


# Serve awaits a replica's async __del__ itself; here it is awaited by hand, and Python's
# own finalizer call at garbage collection only makes a coroutine nobody needs.
@pytest.mark.filterwarnings("ignore:coroutine 'PolicyScorer.__del__' was never awaited")
async def test_a_policy_changed_in_the_deployed_config_serves_in_place_from_the_log(
    store: DecisionStore, store_settings: StoreSettings, tmp_path: Path
) -> None:
    # What Serve does on a lightweight update: reconfigure(user_config) on a live replica.
    settings = load_settings(ROOT / "configs/tipgraph.yaml").model_copy(
        update={"store": store_settings.model_copy(update={"spill_dir": str(tmp_path / "wal")})}
    )
    scorer = PolicyScorer.func_or_class(settings, settings.policy)  # the class, no Ray
    try:
        rng = np.random.default_rng(1)
        for i in range(20):
            log_decision(store, f"r{i}", rng.normal(size=DIM), T0)
            give_feedback(store, f"r{i}", 1.0, T0 + timedelta(seconds=5))
        before = scorer.snapshot()["policy_version"]
        scorer.reconfigure(policy_user_config(settings.policy))  # as deployed: nothing to do
        assert scorer.snapshot()["policy_version"] == before
        changed = parse_policy({**settings.policy.model_dump(), "alpha": 2.0})
        scorer.reconfigure(policy_user_config(changed))
        after = scorer.snapshot()
        assert after["policy_version"] != before
        assert after["n_updates"] == 20  # rebuilt from everything the log has learned
        # The new settings' digest; the part after the dot counts updates.
        fresh = make_policy(changed, DIM, spec_version=FEATURE_SPEC.version).version
        assert after["policy_version"].rsplit(".", 1)[0] == fresh.rsplit(".", 1)[0]
    finally:
        await scorer.__del__()


def test_export_carries_the_earlier_layout_over_as_tuning_does(
    store: DecisionStore, tmp_path: Path
) -> None:
    import pandas as pd

    from tuning.export import export_log

    (earlier,) = EARLIER_LAYOUTS
    log_decision(store, "old", np.ones(earlier.dim), T0, earlier.version)
    log_decision(store, "new", np.ones(DIM), T0 + timedelta(seconds=1))
    for event_id in ("old", "new"):
        assert give_feedback(store, event_id, 1.0, T0 + timedelta(seconds=2)).learned
    out = tmp_path / "log.csv"
    assert export_log(store, out) == (2, 2)
    frame = pd.read_csv(out)
    assert set(frame["meta_feature_version"]) == {FEATURE_SPEC.version}
    assert frame[f"x_{RECENCY_FEATURE}"].tolist() == [0.0, 1.0]
    assert frame["x_judge_score"].tolist() == [1.0, 1.0]
