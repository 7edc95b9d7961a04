"""One trial of the sweep, in plain Python: the search space Tune samples, the policy a
sampled configuration describes, and its progressive replay over the log.  The Ray trainable
(:func:`run_trial`) is a thin shell around :func:`evaluate`."""

from __future__ import annotations

import time
import typing
from collections.abc import Mapping
from typing import Any

from tipgraph.policies import Policy, make_policy
from tipgraph.settings import (
    FeatureGroup,
    LinearModelSettings,
    PolicyKind,
    PolicySettings,
    parse_policy,
    policy_fields,
)
from tuning.config import EvaluationSettings, Range, SearchSpace
from tuning.data import TrainingLog
from tuning.logged import LoggedBandit
from tuning.ope import Estimate, progressive

METRIC = "lower"
"""What the search maximises: the lower end of the estimate's 95% interval."""
ALL_FEATURES = "all"
TUNED = ("ridge", "epsilon", "alpha", "v", "temperature", "gamma")
"""The hyperparameters a sweep samples; the others (ts_draws, refresh_every) are fixed."""
KIND_PARAMETERS: dict[str, tuple[str, ...]] = {
    kind: tuple(name for name in TUNED if name in policy_fields(kind))
    for kind in typing.get_args(PolicyKind)
}
"""The hyperparameters each kind reads; a trial logs (and is built from) only these."""


def feature_label(groups: tuple[FeatureGroup, ...] | None) -> str:
    return ALL_FEATURES if groups is None else "+".join(groups)


def param_space(space: SearchSpace) -> dict[str, Any]:
    """Tune's flat space: every kind's parameters; a trial reads its kind's (KIND_PARAMETERS)."""
    from ray import tune  # heavy: Ray Tune loads only in the processes that sweep

    def sample(r: Range) -> Any:
        if r.low == r.high:
            return r.low
        return tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)

    # Categorical values must be primitives for Optuna: feature subsets travel as labels.
    return {
        "kind": tune.choice(list(space.kinds)),
        "features": tune.choice([feature_label(s) for s in space.feature_subsets]),
        # 0 stands for "remember all": Optuna's categoricals must be primitives.
        "half_life_s": tune.choice([h or 0.0 for h in space.half_lives_s]),
        **{name: sample(getattr(space, name)) for name in TUNED},
    }


def policy_settings(config: Mapping[str, Any], *, ts_draws: int = 64) -> PolicySettings:
    """The policy a trial's sampled ``config`` describes (its kind's parameters only)."""
    kind = str(config["kind"])
    fields: dict[str, Any] = {name: config[name] for name in KIND_PARAMETERS[kind]}
    if kind == "lints":
        fields["ts_draws"] = ts_draws
    if "features" in policy_fields(kind):
        label = str(config.get("features", ALL_FEATURES))
        fields["features"] = None if label == ALL_FEATURES else tuple(label.split("+"))
    if "half_life_s" in policy_fields(kind):
        fields["half_life_s"] = float(config.get("half_life_s") or 0.0) or None
    return parse_policy({"name": kind, "kind": kind, **fields})


def trial_params(settings: PolicySettings) -> dict[str, str]:
    """What a trial's MLflow run records as params: its kind and the values it used."""
    params: dict[str, str] = {"kind": settings.kind}
    for name in KIND_PARAMETERS[settings.kind]:
        params[name] = f"{getattr(settings, name):.6g}"
    if settings.kind == "lints":
        params["ts_draws"] = str(settings.ts_draws)
    if isinstance(settings, LinearModelSettings):
        params["features"] = feature_label(settings.features)
        half_life = settings.half_life_s
        params["half_life_s"] = "none" if half_life is None else f"{half_life:.6g}"
    return params


def describe(settings: PolicySettings) -> str:
    return " ".join(f"{k}={v}" for k, v in trial_params(settings).items() if k != "kind")


def progressive_value(
    policy: Policy, log: LoggedBandit, evaluation: EvaluationSettings
) -> Estimate:
    """:func:`~tuning.ope.progressive` with the tuning config's ``evaluation:`` settings."""
    return progressive(
        policy,
        log,
        estimator=evaluation.estimator,
        clip=evaluation.clip,
        ridge=evaluation.reward_model_ridge,
        reward_bounds=evaluation.reward_bounds,
    )


def evaluate(
    settings: PolicySettings, training: TrainingLog, evaluation: EvaluationSettings
) -> tuple[Policy, Estimate]:
    """Replay ``settings`` progressively over the log; the policy ends warm-started on it."""
    policy = make_policy(settings, training.log.dim, spec_version=training.spec_version)
    estimate = progressive_value(policy, training.log, evaluation)
    # The exact inverse, as a loaded copy computes it: the registered model then answers
    # bit for bit like this one (to a few ulps with half_life_s), not within Sherman–Morrison's
    # rounding.
    policy.stats_.refresh()
    return policy, estimate


def run_trial(
    config: dict[str, Any],
    training: TrainingLog,
    evaluation: EvaluationSettings,
    ts_draws: int,
) -> dict[str, float]:
    """The Tune trainable: one configuration, one progressive replay, one result."""
    started = time.perf_counter()
    _, estimate = evaluate(policy_settings(config, ts_draws=ts_draws), training, evaluation)
    elapsed = time.perf_counter() - started
    return {
        "value": estimate.value,
        "lower": estimate.lower,
        "upper": estimate.upper,
        "n_events": float(estimate.n_events),
        "replay_s": elapsed,
        "events_per_s": estimate.n_events / elapsed if elapsed > 0 else 0.0,
    }
