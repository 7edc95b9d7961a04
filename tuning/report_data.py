"""What ``tipgraph report`` shows, computed from logged decisions: numbers only, no plots.

:func:`build_report` takes the learned decisions (:meth:`DecisionStore.logged_events`) and
every policy's run on them (:meth:`DecisionStore.logged_policy_runs`) and computes

* the value of every policy, served and shadows, with one off-policy estimator (the
  tuning config's, :func:`make_estimator`) over the events the policy logged a
  distribution for.  The served policy's target is its own logged distribution, so its
  estimate is an on-policy one (close to its realised mean reward);
* each policy's value per time bucket: realised mean reward while it served, SNIPS on
  the bucket's events while it shadowed (:data:`BUCKET_ESTIMATOR`);
* how often each shadow chose the candidate that was served, overall and per bucket;
* the realised mean reward per prompt version (the prompt A/B split);
* the share of decisions whose LLM generation fell back to task tips.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from tipgraph.holdout import HOLDOUT_PREFIX, RewardStats, welch_lift
from tipgraph.store.records import LoggedEvent, LoggedRuns, PolicyRole
from tuning.config import EvaluationSettings
from tuning.data import from_events
from tuning.importance import GroupImportance
from tuning.logged import LoggedBandit, LogValidationError
from tuning.ope import (
    SNIPS,
    Estimate,
    Estimator,
    EstimatorError,
    estimator_named,
    normal_estimate,
)

FALLBACK_SOURCE = "fallback"
"""``decisions.generation_source`` of a decision whose LLM generation fell back to tasks."""
LLM_SOURCES = frozenset({"llm", "mixed", FALLBACK_SOURCE})
"""Sources of decisions that asked the LLM; only these can fall back."""
NO_PROMPT = "(none)"
"""The label of decisions without a prompt version (task-mode candidates, no LLM)."""
REALISED = "realised"
BUCKET_ESTIMATOR = SNIPS()
"""Shadows' value per time bucket.  A bucket holds few decisions, and SNIPS, a weighted mean
of the observed rewards, stays within their range however heavy a few weights are; IPS
or DR on a dozen decisions can land far outside it."""
AUTO_BUCKETS = 20
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UPDATES = re.compile(r"\.\d+$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def make_estimator(evaluation: EvaluationSettings) -> Estimator:
    """The estimator the tuning config judges with (``evaluation:`` in configs/tuning.yaml),
    for fixed logged distributions rather than a progressive replay."""
    return estimator_named(
        evaluation.estimator,
        clip=evaluation.clip,
        ridge=evaluation.reward_model_ridge,
        reward_bounds=evaluation.reward_bounds,
    )


# -- time buckets -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketSpec:
    """How to cut the log into buckets: ``events`` per bucket, a fixed ``width`` aligned
    on the Unix epoch (``1d`` buckets start at midnight UTC), or neither: ``auto``, the
    log's time span cut into :data:`AUTO_BUCKETS` equal parts."""

    events: int | None = None
    width: timedelta | None = None

    @classmethod
    def parse(cls, spec: str) -> BucketSpec:
        """``auto``, a number of events (``500``), or a duration (``30m``, ``1h``, ``1d``)."""
        text = spec.strip().lower()
        if text == "auto":
            return cls()
        if text.isdigit() and int(text) > 0:
            return cls(events=int(text))
        match = _DURATION.match(text)
        if match and int(match.group(1)) > 0:
            return cls(width=timedelta(seconds=int(match.group(1)) * _UNIT_S[match.group(2)]))
        raise ValueError(
            f"bucket must be 'auto', a number of events (e.g. 500) or a duration "
            f"(e.g. 30m, 1h, 1d, 1w), got {spec!r}"
        )


@dataclass(frozen=True)
class Bucket:
    """One time bucket: [start, end) for time buckets, first to last event for
    event-count buckets."""

    start: datetime
    end: datetime
    n_events: int

    @property
    def middle(self) -> datetime:
        return self.start + (self.end - self.start) / 2


@dataclass(frozen=True)
class Buckets:
    label: str
    buckets: list[Bucket]
    index: np.ndarray = field(repr=False)
    """The bucket of every event, integer array of shape (n_events,)."""


def make_buckets(times: Sequence[datetime], spec: BucketSpec) -> Buckets:
    """Cut time-ordered ``times`` into non-empty buckets."""
    seconds = np.array([(t - _EPOCH).total_seconds() for t in times])
    origin, width = 0.0, 0.0  # width 0: the bucket spans its first to its last event
    if spec.events is not None:
        raw = np.arange(len(seconds)) // spec.events
        label = f"{spec.events} decisions"
    elif spec.width is not None:
        width = spec.width.total_seconds()
        raw = (seconds // width).astype(np.int64)
        label = _duration_label(width)
    else:
        origin = float(seconds[0])
        width = (float(seconds[-1]) - origin) / AUTO_BUCKETS
        if width > 0:
            # The last event sits exactly on the end of the span: keep it in the last bucket.
            raw = np.minimum((seconds - origin) // width, AUTO_BUCKETS - 1).astype(np.int64)
            label = f"auto ({_duration_label(width)})"
        else:
            raw = np.zeros(len(seconds), dtype=np.int64)
            label = "auto (one bucket)"
    keys, index = np.unique(raw, return_inverse=True)
    counts = np.bincount(index, minlength=len(keys))
    buckets = []
    for b, key in enumerate(keys.tolist()):
        if width > 0:
            start = _EPOCH + timedelta(seconds=origin + key * width)
            end = start + timedelta(seconds=width)
        else:
            members = np.flatnonzero(index == b)
            start, end = times[int(members[0])], times[int(members[-1])]
        buckets.append(Bucket(start, end, int(counts[b])))
    return Buckets(label, buckets, index.astype(np.int64))


def _duration_label(seconds: float) -> str:
    for unit, size in (("w", 604_800), ("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"


# -- what the report holds --------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyValue:
    """One policy's estimated value, overall and per bucket.

    ``n_scored`` events (of ``n_runs`` it ran on) carry its distribution; the estimates use
    only those.  ``over_time[b]`` is the realised mean reward if the policy served every
    such decision of bucket b, else :data:`BUCKET_ESTIMATOR`'s estimate; None where the
    bucket has nothing to estimate from.
    """

    name: str
    role: str
    """served, shadow, or "served, shadow" when the policy changed role in the window."""
    version: str
    """The last version seen: ``<kind>-<params digest>.<updates>``, so it changes with
    every reward a learner learns from ("" if the policy never answered)."""
    n_models: int
    """Distinct models seen (versions without their update count): > 1 after a new
    champion or a configuration change."""
    n_runs: int
    n_scored: int
    estimate: Estimate | None
    note: str
    over_time: list[Estimate | None]


@dataclass(frozen=True)
class Agreement:
    """How often a shadow chose the served candidate, over ``n_events`` where it chose."""

    name: str
    rate: float | None
    n_events: int
    over_time: list[float | None]


@dataclass(frozen=True)
class PromptValue:
    """Realised mean reward of the decisions made with one prompt version."""

    prompt_version: str
    n_events: int
    reward: Estimate
    fallback_rate: float


@dataclass(frozen=True)
class FallbackRate:
    rate: float
    n_fallback: int
    n_events: int
    n_llm: int
    """Decisions that asked the LLM: the rest used task tips and cannot fall back."""
    sources: dict[str, int]
    over_time: list[float]


@dataclass(frozen=True)
class Lift:
    """Realised mean reward of the bandit's decisions minus the holdout's, on one day (or
    overall: ``day`` None), with a 95% interval: Welch's normal interval, mean difference
    ± z·√(s²_b/n_b + s²_h/n_h)."""

    day: str | None
    lift: float
    lower: float
    upper: float
    bandit_mean: float
    holdout_mean: float
    n_bandit: int
    n_holdout: int


def holdout_lift(events: Sequence[LoggedEvent]) -> list[Lift]:
    """Overall first, then per UTC day; empty without holdout decisions.  Days where either
    group has fewer than 2 decisions are left out (no variance to build an interval on)."""
    if not any(e.policy_name.startswith(HOLDOUT_PREFIX) for e in events):
        return []
    days = sorted({e.created_at.date().isoformat() for e in events})
    lifts = [_lift(None, events)]
    for day in days:
        lifts.append(_lift(day, [e for e in events if e.created_at.date().isoformat() == day]))
    return [lift for lift in lifts if lift.n_bandit >= 2 and lift.n_holdout >= 2]


def _lift(day: str | None, events: Sequence[LoggedEvent]) -> Lift:
    held = _stats(e.reward for e in events if e.policy_name.startswith(HOLDOUT_PREFIX))
    bandit = _stats(e.reward for e in events if not e.policy_name.startswith(HOLDOUT_PREFIX))
    if held.n < 2 or bandit.n < 2:
        return Lift(day, math.nan, math.nan, math.nan, math.nan, math.nan, bandit.n, held.n)
    diff, lower, upper = welch_lift(bandit, held)
    return Lift(day, diff, lower, upper, bandit.mean, held.mean, bandit.n, held.n)


def _stats(rewards: Iterable[float]) -> RewardStats:
    values = np.fromiter(rewards, dtype=np.float64)
    return RewardStats(len(values), float(values.sum()), float(np.square(values).sum()))


@dataclass(frozen=True)
class Report:
    estimator: str
    n_events: int
    first_at: datetime
    last_at: datetime
    filters: dict[str, str | None]
    buckets: Buckets
    served_reward: Estimate
    """Realised mean reward of every decision in the window."""
    policies: list[PolicyValue]
    agreement: list[Agreement]
    prompt_versions: list[PromptValue]
    fallback: FallbackRate
    notes: list[str] = field(default_factory=list)
    importance: list[GroupImportance] = field(default_factory=list)
    lift: list[Lift] = field(default_factory=list)
    """On-policy lift over the holdout, overall then per day (:func:`holdout_lift`)."""
    """The served policy's value with each feature group left out (tuning.importance)."""


# -- computing it -----------------------------------------------------------------------------


@dataclass
class _PolicyColumns:
    """One policy's runs laid out along the log: what :func:`_policy_value` needs."""

    pi: list[np.ndarray | None]
    chosen: np.ndarray
    served: np.ndarray
    shadow: np.ndarray
    versions: list[str]
    errors: Counter[str]


def _columns(
    name: str, log: LoggedBandit, events: Sequence[LoggedEvent], runs: Mapping[str, LoggedRuns]
) -> _PolicyColumns:
    n = log.n_events
    columns = _PolicyColumns(
        pi=[None] * n,
        chosen=np.full(n, -1),
        served=np.zeros(n, dtype=bool),
        shadow=np.zeros(n, dtype=bool),
        versions=[],
        errors=Counter(),
    )
    for i, event in enumerate(events):
        logged = runs.get(event.event_id)
        run = next((r for r in logged.runs if r.policy_name == name), None) if logged else None
        if run is None:
            continue
        columns.served[i] = run.role == "served"
        columns.shadow[i] = run.role == "shadow"
        if not columns.versions or columns.versions[-1] != run.policy_version:
            columns.versions.append(run.policy_version)
        if run.error:
            columns.errors[run.error.splitlines()[0][:200]] += 1
        if len(run.probabilities) == len(event.features):
            columns.pi[i] = np.asarray(run.probabilities)
        if run.chosen is not None:
            columns.chosen[i] = run.chosen
    return columns


def _estimate(
    estimator: Estimator, log: LoggedBandit, pi: list[np.ndarray | None], mask: np.ndarray
) -> tuple[Estimate | None, str]:
    """The estimator on the events of ``mask`` (those must have a distribution)."""
    if not mask.any():
        return None, "no data"
    try:
        subset = log if mask.all() else log.subset(mask)
        target = np.concatenate(
            [p for p, keep in zip(pi, mask, strict=True) if keep and p is not None]
        )
        return estimator.estimate(subset, target), ""
    except (EstimatorError, LogValidationError) as err:
        return None, f"no estimate: {err}"


def _realised(log: LoggedBandit, mask: np.ndarray) -> Estimate | None:
    if not mask.any():
        return None
    return normal_estimate(log.reward[mask], REALISED)


def _policy_value(
    name: str,
    role: str,
    columns: _PolicyColumns,
    log: LoggedBandit,
    buckets: Buckets,
    estimator: Estimator,
) -> PolicyValue:
    scored = np.array([p is not None for p in columns.pi], dtype=bool)
    n_runs = int((columns.served | columns.shadow).sum())
    estimate, note = _estimate(estimator, log, columns.pi, scored)
    if n_runs == 0:
        note = "no data: no runs logged in this window"
    elif not scored.any():
        top = columns.errors.most_common(1)
        note = "no data: no run logged a distribution" + (
            f" (most common error: {top[0][0]})" if top else ""
        )
    elif scored.sum() < log.n_events:
        missing = log.n_events - int(scored.sum())
        note = (
            f"estimated on the {int(scored.sum())} of {log.n_events} decisions it logged a "
            f"distribution for ({missing} failed or missing)" + (f"; {note}" if note else "")
        )
    over_time: list[Estimate | None] = []
    for b in range(len(buckets.buckets)):
        mask = scored & (buckets.index == b)
        if mask.any() and columns.served[mask].all():
            over_time.append(_realised(log, mask))
        else:
            over_time.append(_estimate(BUCKET_ESTIMATOR, log, columns.pi, mask)[0])
    return PolicyValue(
        name=name,
        role=role,
        version=columns.versions[-1] if columns.versions else "",
        n_models=len({_UPDATES.sub("", v) for v in columns.versions if v}),
        n_runs=n_runs,
        n_scored=int(scored.sum()),
        estimate=estimate,
        note=note,
        over_time=over_time,
    )


def _agreement(
    name: str, columns: _PolicyColumns, log: LoggedBandit, buckets: Buckets
) -> Agreement:
    chose = columns.shadow & (columns.chosen >= 0)
    same = columns.chosen == log.chosen
    over_time: list[float | None] = []
    for b in range(len(buckets.buckets)):
        mask = chose & (buckets.index == b)
        over_time.append(float(same[mask].mean()) if mask.any() else None)
    return Agreement(
        name=name,
        rate=float(same[chose].mean()) if chose.any() else None,
        n_events=int(chose.sum()),
        over_time=over_time,
    )


def _role(columns: _PolicyColumns, expected: PolicyRole | None) -> str:
    roles = [
        r for r, seen in (("served", columns.served), ("shadow", columns.shadow)) if seen.any()
    ]
    return ", ".join(roles) if roles else (expected or "shadow")


def _policy_names(
    events: Sequence[LoggedEvent],
    runs: Mapping[str, LoggedRuns],
    expected: Mapping[str, PolicyRole],
) -> list[str]:
    """Served policies first (in order of appearance), then shadows by name."""
    served = list(dict.fromkeys(e.policy_name for e in events))
    others = {r.policy_name for logged in runs.values() for r in logged.runs} | set(expected)
    return served + sorted(others - set(served))


def _prompt_values(
    events: Sequence[LoggedEvent], log: LoggedBandit, fell_back: np.ndarray
) -> list[PromptValue]:
    labels = np.array([e.prompt_version or NO_PROMPT for e in events])
    values = []
    for label in sorted(set(labels.tolist())):
        mask = labels == label
        values.append(
            PromptValue(
                prompt_version=label,
                n_events=int(mask.sum()),
                reward=normal_estimate(log.reward[mask], REALISED),
                fallback_rate=float(fell_back[mask].mean()),
            )
        )
    return values


def _fallback(sources: list[str], buckets: Buckets) -> tuple[FallbackRate, np.ndarray]:
    fell_back = np.array([s == FALLBACK_SOURCE for s in sources], dtype=bool)
    over_time = [float(fell_back[buckets.index == b].mean()) for b in range(len(buckets.buckets))]
    rate = FallbackRate(
        rate=float(fell_back.mean()),
        n_fallback=int(fell_back.sum()),
        n_events=len(sources),
        n_llm=sum(s in LLM_SOURCES for s in sources),
        sources=dict(Counter(sources).most_common()),
        over_time=over_time,
    )
    return rate, fell_back


def build_report(
    events: Sequence[LoggedEvent],
    runs: Sequence[LoggedRuns],
    *,
    estimator: Estimator,
    bucket: BucketSpec | None = None,
    expected: Mapping[str, PolicyRole] | None = None,
    filters: Mapping[str, str | None] | None = None,
    notes: Sequence[str] = (),
) -> Report:
    """Everything the report shows, from time-ordered ``events`` and their ``runs``.

    ``expected`` names policies to list even without runs (the configured served policy
    and shadows), so a shadow that logged nothing shows as "no data".  Raises ValueError
    when there are no events.
    """
    if not events:
        raise ValueError(
            "no logged decisions with rewards match the filters: nothing to report "
            "(decisions get a reward from feedback, or the default reward after the wait)"
        )
    expected = dict(expected or {})
    by_event = {r.event_id: r for r in runs}
    log = from_events(events)
    buckets = make_buckets([e.created_at for e in events], bucket or BucketSpec())
    policies, agreement = [], []
    for name in _policy_names(events, by_event, expected):
        columns = _columns(name, log, events, by_event)
        role = _role(columns, expected.get(name))
        policies.append(_policy_value(name, role, columns, log, buckets, estimator))
        if "shadow" in role:
            agreement.append(_agreement(name, columns, log, buckets))
    sources = [
        by_event[e.event_id].generation_source if e.event_id in by_event else "unknown"
        for e in events
    ]
    fallback, fell_back = _fallback(sources, buckets)
    return Report(
        estimator=_estimator_label(estimator),
        n_events=log.n_events,
        first_at=events[0].created_at,
        last_at=events[-1].created_at,
        filters=dict(filters or {}),
        buckets=buckets,
        served_reward=normal_estimate(log.reward, REALISED),
        policies=policies,
        agreement=agreement,
        prompt_versions=_prompt_values(events, log, fell_back),
        fallback=fallback,
        notes=list(notes),
        lift=holdout_lift(events),
    )


def _estimator_label(estimator: Estimator) -> str:
    clip = getattr(estimator, "clip", None)
    return estimator.name if clip is None else f"{estimator.name}(clip={clip:g})"


def finite(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (JSON has no inf or NaN)."""
    return value if value is not None and math.isfinite(value) else None
