"""The tuning job's configuration (``configs/tuning.yaml``): what to sweep, on which log,
judged how.  Read by the sweep, the report and the CLI; it imports none of them."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tipgraph.settings import EpsilonGreedySettings, FeatureGroup, PolicyKind, PolicySettings
from tipgraph.store import LogFilter
from tuning.ope import ProgressiveEstimator

DEFAULT_TUNING_CONFIG = Path("configs/tuning.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Range(_Strict):
    """A continuous hyperparameter range; ``log`` samples it on a log scale."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low > self.high:
            raise ValueError(f"low={self.low} exceeds high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low}")
        return self


class SearchSpace(_Strict):
    kinds: tuple[PolicyKind, ...] = Field(
        ("linucb", "lints", "egreedy", "softmax", "squarecb"), min_length=1
    )
    ridge: Range = Range(low=0.1, high=10.0, log=True)
    epsilon: Range = Range(low=0.0, high=0.2)
    alpha: Range = Range(low=0.01, high=3.0, log=True)
    v: Range = Range(low=0.01, high=1.0, log=True)
    temperature: Range = Range(low=0.01, high=1.0, log=True)
    gamma: Range = Range(low=10.0, high=3000.0, log=True)
    ts_draws: int = Field(64, ge=1, description="lints: fixed, it sets cost more than quality")
    feature_subsets: tuple[tuple[FeatureGroup, ...] | None, ...] = Field(
        (None,), min_length=1, description="Feature-group subsets to try; null = all features"
    )
    half_lives_s: tuple[float | None, ...] = Field(
        (None,),
        min_length=1,
        description="Forgetting half-lives to try (seconds of the log's decision times); "
        "null = remember every reward",
    )

    @field_validator("half_lives_s")
    @classmethod
    def _positive(cls, values: tuple[float | None, ...]) -> tuple[float | None, ...]:
        if any(v is not None and not v > 0 for v in values):
            raise ValueError(f"half_lives_s must be > 0 or null, got {list(values)}")
        return values


class LogSource(_Strict):
    """Where the logged events come from."""

    source: Literal["store", "file", "simulator"] = "store"
    store_url: str | None = Field(None, description="store: default the tipgraph config's")
    path: str | None = Field(None, description="file: a CSV or Parquet log (docs/tuning.md)")
    since: datetime | None = None
    until: datetime | None = None
    prompt_version: str | None = None
    policy_name: str | None = None
    events: int = Field(20_000, ge=1, description="simulator: number of logged decisions")
    seed: int = 0
    users: int = Field(50, ge=1)
    logging_policy: PolicySettings = EpsilonGreedySettings(name="egreedy", epsilon=0.2)

    def log_filter(self) -> LogFilter:
        """The decisions of the decision log (or time window of a file) this selects."""
        return LogFilter(self.since, self.until, self.prompt_version, self.policy_name)

    @model_validator(mode="after")
    def _has_path(self) -> LogSource:
        if self.source == "file" and not self.path:
            raise ValueError("log.source 'file' needs log.path")
        return self


class EvaluationSettings(_Strict):
    estimator: ProgressiveEstimator = Field(
        "dr",
        description="dr, snips, switch-dr, dros, sndr, or narrowest (of the DR family, the "
        "estimate with the narrowest valid interval); docs/tuning.md",
    )
    clip: float | None = Field(None, gt=0, description="dr: clip importance weights at this")
    reward_model_ridge: float = Field(1.0, gt=0)
    reward_bounds: tuple[float, float] = (0.0, 1.0)

    @model_validator(mode="after")
    def _clip_for_dr(self) -> EvaluationSettings:
        if self.clip is not None and self.estimator != "dr":
            raise ValueError(f"evaluation.clip applies to estimator dr, not {self.estimator}")
        if self.estimator == "ips":
            raise ValueError("evaluation.estimator ips is too noisy to rank policies: use dr")
        return self


class TuningSettings(_Strict):
    tipgraph_config: str | None = Field(
        None, description="Store, registry and served policy (default: configs/tipgraph.yaml)"
    )
    tipgraph_overlays: tuple[str, ...] = Field(
        (), description="Overlays merged on tipgraph_config, e.g. configs/k3s/base.yaml"
    )
    log: LogSource = LogSource()
    evaluation: EvaluationSettings = EvaluationSettings()
    search: Literal["optuna", "random"] = "optuna"
    num_samples: int = Field(32, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: one per CPU")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (None: all)")
    seed: int = 0
    space: SearchSpace = SearchSpace()
    experiment: str = "tipgraph-tuning"
    register_winner: bool = Field(True, alias="register")
    storage_path: str = "var/tune"


def load_tuning_settings(path: str | os.PathLike[str] | None = None) -> TuningSettings:
    path = Path(path) if path is not None else DEFAULT_TUNING_CONFIG
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return TuningSettings(**data)
