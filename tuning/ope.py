"""Off-policy estimators: the value of a target policy π from a log collected by μ.

Notation, for a :class:`~tuning.logged.LoggedBandit` with n events and N candidate rows:

* ``action_dist``: array of shape (N,), π(a | x_i) for every candidate, laid out like
  ``log.pscore`` (rows ``offsets[i]:offsets[i+1]`` sum to 1).
* w_i = π(a_i | x_i) / μ(a_i | x_i), the importance weight of the logged action.
* V(π) = (1/n) Σ_i Σ_a π(a | x_i) E[r | x_i, a], the value on the logged contexts.

Every estimator returns an :class:`Estimate` with a 95% interval: the normal approximation
over per-event terms t_i, V̂ = mean(t) ± z · sd(t) / √n (ratio estimators: over their
delta-method influence terms), widened on the side the terms are skewed to
(:func:`skew_aware_interval`).  When clipping (or a target's mass on candidates the
logger never offers) biases an estimate, the interval is widened by an exact bound of
that bias, computed from all logged propensities and the reward range; the point value
stays the usual estimator.

:func:`target_distribution` turns a static policy into ``action_dist``; :func:`progressive`
evaluates a *learning* policy event by event, like Azure Personalizer's offline
evaluation.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import ClassVar, Literal

import numpy as np

from tipgraph.policies import Policy
from tuning.diagnostics import Diagnostics, diagnose
from tuning.logged import LoggedBandit, check_distribution, event_of_row

Z_95 = NormalDist().inv_cdf(0.975)
UNIFORM_TOLERANCE = 1e-9
ONLINE_BLOCK = 16
"""Events per refit of the progressive reward model; every prediction uses earlier events."""
ONLINE_CHUNK_BYTES = 64 << 20
"""About the memory :func:`online_predictions` stacks per solve (one d × d matrix per
block), so a log with thousands of features stays in bounds."""


class EstimatorError(ValueError):
    """An estimator that cannot answer for this log and target (no overlap, wrong logger)."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate of V(π) with its 95% interval [lower, upper], and what the log's
    propensities support (:mod:`tuning.diagnostics`; None where not computed)."""

    value: float
    lower: float
    upper: float
    n_events: int
    name: str
    diagnostics: Diagnostics | None = None

    def covers(self, truth: float) -> bool:
        return self.lower <= truth <= self.upper


def skew_aware_interval(
    value: float,
    influence: np.ndarray,
    name: str,
    bias: tuple[float, float] = (0.0, 0.0),
) -> Estimate:
    """``value`` ± z·se from centred influence terms ψ of shape (n,), se = sd(ψ)/√n.

    Importance weights make ψ skewed (rare large weights), and the Wald interval then
    misses mostly on one side.  For the studentised mean, P(T ≤ x) ≈ Φ(x) + γ (2x² + 1)
    φ(x) / (6√n), with γ the skewness of ψ (Hall 1992, "The Bootstrap and Edgeworth
    Expansion", §2.6; Johnson 1978, JASA 73, "Modified t tests and confidence intervals for
    asymmetrical populations").  The side the skew points to is widened by
    c = |γ̂| (2z² + 1) / (6√n) standard errors; the other side keeps z, because γ̂ is itself
    noisy when large weights are rare, so the correction only ever widens the interval.

    ``bias`` = (b_lo, b_hi) bounds V − E[value]; it is added to the two ends.  With fewer
    than two terms the interval is unbounded.
    """
    n = len(influence)
    if n < 2:
        return Estimate(value, -math.inf, math.inf, n, name)
    sd = float(influence.std(ddof=1))
    se = sd / math.sqrt(n)
    skew = float(np.mean(influence**3)) / sd**3 if sd > 0 else 0.0
    c = skew * (2 * Z_95**2 + 1) / (6 * math.sqrt(n))
    lower = value - se * (Z_95 + max(-c, 0.0)) + bias[0]
    upper = value + se * (Z_95 + max(c, 0.0)) + bias[1]
    return Estimate(value, lower, upper, n, name)


def normal_estimate(
    terms: np.ndarray, name: str, bias: tuple[float, float] = (0.0, 0.0)
) -> Estimate:
    """V̂ = mean(t) over per-event terms of shape (n,), interval from :func:`skew_aware_interval`.

    Per-event terms are martingale differences around V(π) even for an adaptive logger (the
    logged μ is the probability the action was drawn with), so their spread gives the se.
    """
    value = float(terms.mean())
    return skew_aware_interval(value, terms - value, name, bias)


def ratio_estimate(weights: np.ndarray, reward: np.ndarray, name: str) -> Estimate:
    """V̂ = Σ w r / Σ w over arrays of shape (n,), with a delta-method interval.

    Linearising the ratio around V̂ gives the influence terms ψ_i = w_i (r_i − V̂) / w̄, so
    se = sd(ψ)/√n; the interval is :func:`skew_aware_interval` over ψ.
    """
    total = float(weights.sum())
    if total <= 0.0:
        raise EstimatorError(
            f"{name}: the target gives probability 0 to every logged action; "
            f"a self-normalised estimate is undefined"
        )
    value = float(weights @ reward) / total
    influence = weights * (reward - value) * (len(weights) / total)
    return skew_aware_interval(value, influence, name)


# -- reward models: ridge regression r̂(x) = θᵀx on the chosen candidates --------------------


def ridge_theta(gram: np.ndarray, b: np.ndarray, ridge: float) -> np.ndarray:
    """θ = (λI + Σ xxᵀ)⁻¹ Σ r x, from the statistics gram (d, d) and b (d,)."""
    return np.linalg.solve(gram + ridge * np.eye(len(b)), b)


def fitted_predictions(log: LoggedBandit, ridge: float) -> np.ndarray:
    """r̂ of every candidate, shape (N,), from one ridge fit on all n chosen candidates."""
    x = log.chosen_features()
    return log.X @ ridge_theta(x.T @ x, x.T @ log.reward, ridge)


def crossfit_predictions(log: LoggedBandit, ridge: float, folds: int) -> np.ndarray:
    """r̂ of every candidate, shape (N,), each from a ridge fit on the *other* folds.

    Event i is in fold i mod ``folds``; with ``folds`` = 1 the model is fitted in sample.
    Chernozhukov et al. (2018), "Double/debiased machine learning for treatment and
    structural parameters", Econometrics Journal.
    """
    if folds == 1:
        return fitted_predictions(log, ridge)
    x, r = log.chosen_features(), log.reward
    event_fold = np.arange(log.n_events) % folds
    row_fold = np.repeat(event_fold, log.n_candidates)
    gram_all, b_all = x.T @ x, x.T @ r
    predictions = np.empty(log.n_rows)
    for k in range(folds):
        xk, rk = x[event_fold == k], r[event_fold == k]
        theta = ridge_theta(gram_all - xk.T @ xk, b_all - xk.T @ rk, ridge)
        rows = row_fold == k
        predictions[rows] = log.X[rows] @ theta
    return predictions


def online_predictions(log: LoggedBandit, ridge: float, block: int = ONLINE_BLOCK) -> np.ndarray:
    """r̂ of every candidate, shape (N,), from a ridge fit on strictly earlier events only.

    The model is refitted every ``block`` events, so the predictions for events
    [s, s + block) use events [0, s): progressive, never peeking at the event it scores.
    """
    x, r, offsets = log.chosen_features(), log.reward, log.offsets
    d = log.dim
    gram, b = np.zeros((d, d)), np.zeros(d)
    predictions = np.empty(log.n_rows)
    starts = list(range(0, log.n_events, block))
    # Per chunk of blocks: the statistics before each block, summed in the order a loop
    # would (so the fits are bit for bit the same), then every refit in one stacked
    # solve: one LAPACK call per chunk, not one per block, which cost more than the
    # policy's own replay.
    size = max(1, min(256, ONLINE_CHUNK_BYTES // (8 * d * d)))
    eye = ridge * np.eye(d)
    for first in range(0, len(starts), size):
        chunk = starts[first : first + size]
        A = np.empty((len(chunk), d, d))
        b_before = np.empty((len(chunk), d))
        for j, s in enumerate(chunk):
            A[j] = gram + eye
            b_before[j] = b
            xs = x[s : s + block]
            gram = gram + xs.T @ xs
            b = b + xs.T @ r[s : s + block]
        thetas = np.linalg.solve(A, b_before[..., None])[..., 0]
        for start, theta in zip(chunk, thetas, strict=True):
            rows = slice(int(offsets[start]), int(offsets[min(start + block, log.n_events)]))
            predictions[rows] = log.X[rows] @ theta
    return predictions


# -- the weighted (IPS / DR) family, shared with progressive evaluation -----------------------


def excess_mass(pi: np.ndarray, mu: np.ndarray, clip: float | None) -> np.ndarray:
    """e_a = (π(a|x) − c·μ(a|x))₊ per candidate, shape (N,); c = ∞ without clipping.

    It is the target mass that min(w, c) cannot reach: all of π(a|x) where μ(a|x) = 0, and
    the part above c·μ where the weight is clipped.
    """
    if clip is None:
        return np.where(mu > 0.0, 0.0, pi)
    return np.maximum(pi - clip * mu, 0.0)


class WeightRule(abc.ABC):
    """What a DR-family estimator does to an importance weight w = π/μ: w ↦ w̃ ≤ w.

    The target mass the correction term then misses at candidate a is
    e_a = π(a|x) (1 − w̃_a / w_a) (all of π(a|x) where μ(a|x) = 0): the bias of the
    estimate is (1/n) Σ_i Σ_a e_{i,a} (E[r|x_i,a] − r̂(x_{i,a})), bounded with the reward
    range (:func:`weighted_estimate`).
    """

    @abc.abstractmethod
    def __call__(self, w: np.ndarray) -> np.ndarray:
        """w̃ for weights w ≥ 0 of any shape."""

    @abc.abstractmethod
    def label(self) -> str: ...

    def excess(self, pi: np.ndarray, mu: np.ndarray) -> np.ndarray:
        supported = mu > 0.0
        w = np.divide(pi, mu, out=np.zeros_like(pi), where=supported)
        kept = np.divide(self(w), w, out=np.ones_like(w), where=w > 0.0)
        return np.where(supported, pi * (1.0 - kept), pi)


@dataclass(frozen=True)
class Clip(WeightRule):
    """w̃ = min(w, c)."""

    c: float | None

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return w if self.c is None else np.minimum(w, self.c)

    def label(self) -> str:
        return "" if self.c is None else f"clip={self.c:g}"

    def excess(self, pi: np.ndarray, mu: np.ndarray) -> np.ndarray:
        return excess_mass(pi, mu, self.c)  # exact zeros where nothing is clipped


@dataclass(frozen=True)
class Switch(WeightRule):
    """w̃ = w · 1{w ≤ τ}: above τ the correction is dropped and the model alone answers."""

    tau: float

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return np.where(w <= self.tau, w, 0.0)

    def label(self) -> str:
        return f"tau={self.tau:g}"


@dataclass(frozen=True)
class OptimisticShrinkage(WeightRule):
    """w̃ = λ w / (w² + λ): close to w for small weights, shrunk towards 0 for large ones."""

    lam: float

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return self.lam * w / (np.square(w) + self.lam)

    def label(self) -> str:
        return f"lambda={self.lam:g}"


def weighted_terms(
    log: LoggedBandit, pi: np.ndarray, predictions: np.ndarray | None, rule: WeightRule
) -> np.ndarray:
    """t_i of :func:`weighted_estimate`, shape (n,)."""
    rows = log.chosen_rows
    w = rule(pi[rows] / log.pscore[rows])
    if predictions is None:
        return w * log.reward
    return log.per_event_sum(pi * predictions) + w * (log.reward - predictions[rows])


def weighted_estimate(
    log: LoggedBandit,
    pi: np.ndarray,
    predictions: np.ndarray | None,
    *,
    clip: float | None = None,
    rule: WeightRule | None = None,
    reward_bounds: tuple[float, float],
    name: str,
) -> Estimate:
    """DR with an optional reward model; without one (r̂ ≡ 0) it is IPS.

    t_i = Σ_a π(a|x_i) r̂(x_{i,a}) + w̃_i (r_i − r̂(x_{i,a_i})), with w̃ = ``rule``(w)
    (default: min(w, ``clip``)).  Its bias is V − E[t̄] = (1/n) Σ_i Σ_a e_{i,a}
    (E[r|x_i,a] − r̂(x_{i,a})) with e from :meth:`WeightRule.excess`; with rewards in
    [r_min, r_max] it lies in [(1/n) Σ Σ e (r_min − r̂), (1/n) Σ Σ e (r_max − r̂)], which
    widens the interval.
    """
    rule = Clip(clip) if rule is None else rule
    terms = weighted_terms(log, pi, predictions, rule)
    r = log.reward
    excess = rule.excess(pi, log.pscore)
    if not excess.any():
        return normal_estimate(terms, name)
    low, high = reward_bounds
    outside = (r < low) | (r > high)
    if outside.any():
        event = int(np.flatnonzero(outside)[0])
        raise EstimatorError(
            f"{name}: reward of event {event} is {r[event]}, outside "
            f"reward_bounds={reward_bounds}, which the bias bound of its weights relies on"
        )
    base = np.zeros(log.n_rows) if predictions is None else predictions
    bias = (
        float(log.per_event_sum(excess * (low - base)).mean()),
        float(log.per_event_sum(excess * (high - base)).mean()),
    )
    return normal_estimate(terms, name, bias)


def self_normalised_dr(
    log: LoggedBandit, pi: np.ndarray, predictions: np.ndarray, name: str
) -> Estimate:
    """V̂ = (1/n) Σ_i Σ_a π(a|x_i) r̂(x_{i,a}) + Σ_i w_i (r_i − r̂_i) / Σ_i w_i.

    Delta-method interval: ψ_i = (d_i − d̄) + w_i (r_i − r̂_i − C) / w̄, with d_i the
    direct-method term and C the normalised correction.
    """
    rows = log.chosen_rows
    w = pi[rows] / log.pscore[rows]
    total = float(w.sum())
    if total <= 0.0:
        raise EstimatorError(
            f"{name}: the target gives probability 0 to every logged action; "
            f"a self-normalised estimate is undefined"
        )
    direct = log.per_event_sum(pi * predictions)
    residual = log.reward - predictions[rows]
    correction = float(w @ residual) / total
    value = float(direct.mean()) + correction
    influence = (direct - direct.mean()) + w * (residual - correction) * (len(w) / total)
    return skew_aware_interval(value, influence, name)


def _check_clip(clip: float | None) -> None:
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0 or None, got {clip!r}")


def _check_ridge(ridge: float) -> None:
    if not (math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"ridge must be a finite number > 0, got {ridge!r}")


def _check_reward_bounds(bounds: tuple[float, float]) -> None:
    if len(bounds) != 2 or not all(math.isfinite(b) for b in bounds) or bounds[0] >= bounds[1]:
        raise ValueError(
            f"reward_bounds must be (low, high) with finite low < high, got {bounds!r}"
        )


def _clip_label(name: str, clip: float | None) -> str:
    return name if clip is None else f"{name}(clip={clip:g})"


class Estimator(abc.ABC):
    """Estimates V(π) from a log and π's probabilities ``action_dist`` of shape (N,)."""

    name: ClassVar[str]

    def estimate(self, log: LoggedBandit, action_dist: np.ndarray) -> Estimate:
        pi = check_distribution(action_dist, log.offsets, "action_dist")
        return replace(self._estimate(log, pi), diagnostics=diagnose(log, pi))

    @abc.abstractmethod
    def _estimate(self, log: LoggedBandit, pi: np.ndarray) -> Estimate:
        """``pi`` is validated: shape (N,), a distribution per event."""


@dataclass(frozen=True)
class IPS(Estimator):
    """Inverse propensity scoring, optionally clipped.

    V̂ = (1/n) Σ_i min(w_i, c) r_i, w_i = π(a_i|x_i) / μ(a_i|x_i), with the interval of
    :func:`normal_estimate` over the terms.  Unbiased without clipping when μ covers π;
    clipping at c trades that for variance, and the interval is widened by the exact range
    of the bias, (1/n) Σ_i Σ_a (π − cμ)₊ · [r_min, r_max], from every logged propensity
    (:func:`weighted_estimate`); ``reward_bounds`` = (r_min, r_max) is only used then.
    Horvitz & Thompson (1952); Strehl, Langford, Li, Kakade (2010), "Learning from logged
    implicit exploration data", NeurIPS.
    """

    clip: float | None = None
    reward_bounds: tuple[float, float] = (0.0, 1.0)
    name: ClassVar[str] = "ips"

    def __post_init__(self) -> None:
        _check_clip(self.clip)
        _check_reward_bounds(self.reward_bounds)

    def _estimate(self, log: LoggedBandit, pi: np.ndarray) -> Estimate:
        return weighted_estimate(
            log,
            pi,
            None,
            clip=self.clip,
            reward_bounds=self.reward_bounds,
            name=_clip_label(self.name, self.clip),
        )


def _require_support(log: LoggedBandit, pi: np.ndarray, name: str) -> None:
    unsupported = excess_mass(pi, log.pscore, None) > 0.0
    if unsupported.any():
        row = int(np.flatnonzero(unsupported)[0])
        event = event_of_row(log.offsets, row)
        raise EstimatorError(
            f"{name}: action_dist gives probability to candidate {row - int(log.offsets[event])} "
            f"of event {event}, which the logging policy never chooses (pscore 0); "
            f"use IPS or DR, whose intervals bound that bias"
        )


@dataclass(frozen=True)
class SNIPS(Estimator):
    """Self-normalised IPS: V̂ = Σ_i w_i r_i / Σ_i w_i.

    Biased for finite n but consistent, bounded by the reward range, and usually of lower
    variance than IPS.  Interval by the delta method (:func:`ratio_estimate`).  Needs
    μ(a|x) > 0 wherever π(a|x) > 0.  Swaminathan & Joachims (2015), "The self-normalized
    estimator for counterfactual learning", NeurIPS.
    """

    name: ClassVar[str] = "snips"

    def _estimate(self, log: LoggedBandit, pi: np.ndarray) -> Estimate:
        _require_support(log, pi, self.name)
        rows = log.chosen_rows
        return ratio_estimate(pi[rows] / log.pscore[rows], log.reward, self.name)


@dataclass(frozen=True)
class DM(Estimator):
    """Direct method: V̂ = (1/n) Σ_i Σ_a π(a|x_i) r̂(x_{i,a}).

    r̂(x) = θᵀx is one ridge regression, θ = (λI + Σ_i x_i x_iᵀ)⁻¹ Σ_i r_i x_i over the
    chosen candidates x_i = x_{i,a_i} (shape (n, d)).  The interval is the normal one over
    the per-event terms and treats r̂ as exact: it ignores the model's bias and the
    uncertainty of θ, so it is too narrow whenever the linear model is wrong.
    Dudík, Langford, Li (2011), "Doubly robust policy evaluation and learning", ICML.
    """

    ridge: float = 1.0
    name: ClassVar[str] = "dm"

    def __post_init__(self) -> None:
        _check_ridge(self.ridge)

    def _estimate(self, log: LoggedBandit, pi: np.ndarray) -> Estimate:
        terms = log.per_event_sum(pi * fitted_predictions(log, self.ridge))
        return normal_estimate(terms, self.name)


def _check_folds(folds: int) -> None:
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ValueError(f"folds must be an integer >= 1, got {folds!r}")


class ModelBased(Estimator):
    """An estimator built on the ridge reward model r̂ of :class:`DM`, cross-fitted over
    ``folds`` interleaved folds (event i in fold i mod folds is scored by a model fitted on
    the others), so no event's correction uses a model that saw its own reward; ``folds``
    = 1 fits in sample.  :func:`progressive` hands it a progressive model instead."""

    ridge: float
    folds: int

    def _estimate(self, log: LoggedBandit, pi: np.ndarray) -> Estimate:
        if self.folds > log.n_events:
            raise EstimatorError(f"folds={self.folds} exceeds the log's {log.n_events} events")
        return self.with_predictions(log, pi, crossfit_predictions(log, self.ridge, self.folds))

    @abc.abstractmethod
    def with_predictions(
        self, log: LoggedBandit, pi: np.ndarray, predictions: np.ndarray
    ) -> Estimate:
        """The estimate with r̂ given: ``predictions`` of shape (N,), one per candidate."""


class WeightedDR(ModelBased):
    """A DR estimator whose weights go through a :class:`WeightRule`
    (:func:`weighted_estimate`); named after the rule's setting."""

    reward_bounds: tuple[float, float]

    @abc.abstractmethod
    def rule(self) -> WeightRule: ...

    def _check_model(self) -> None:
        _check_ridge(self.ridge)
        _check_folds(self.folds)
        _check_reward_bounds(self.reward_bounds)

    def with_predictions(
        self, log: LoggedBandit, pi: np.ndarray, predictions: np.ndarray
    ) -> Estimate:
        rule = self.rule()
        return weighted_estimate(
            log,
            pi,
            predictions,
            rule=rule,
            reward_bounds=self.reward_bounds,
            name=f"{self.name}({rule.label()})" if rule.label() else self.name,
        )


@dataclass(frozen=True)
class DR(WeightedDR):
    """Doubly robust: the direct method plus an importance-weighted correction.

    t_i = Σ_a π(a|x_i) r̂(x_{i,a}) + min(w_i, c) (r_i − r̂(x_{i,a_i})), V̂ = mean(t),
    :func:`normal_estimate` over t, widened by the exact bias range of clipping (see
    :func:`weighted_estimate`).  r̂: :class:`ModelBased`.  Unbiased if either μ or r̂ is
    right.  Dudík, Langford, Li (2011), "Doubly robust policy evaluation and learning",
    ICML.
    """

    ridge: float = 1.0
    clip: float | None = None
    folds: int = 2
    reward_bounds: tuple[float, float] = (0.0, 1.0)
    name: ClassVar[str] = "dr"

    def __post_init__(self) -> None:
        _check_clip(self.clip)
        self._check_model()

    def rule(self) -> WeightRule:
        return Clip(self.clip)


@dataclass(frozen=True)
class SwitchDR(WeightedDR):
    """Switch-DR: DR where the weight is at most τ, the direct method alone above it.

    t_i = Σ_a π(a|x_i) r̂(x_{i,a}) + w_i 1{w_i ≤ τ} (r_i − r̂(x_{i,a_i})).  Large weights,
    which carry most of DR's variance, lose their correction; the bias that costs,
    (1/n) Σ_i Σ_a π(a|x_i) 1{w_{i,a} > τ} (E[r|x_i,a] − r̂), is bounded with the reward
    range and widens the interval (:func:`weighted_estimate`).  τ = ∞ is DR.
    Wang, Agarwal, Dudík (2017), "Optimal and adaptive off-policy evaluation in contextual
    bandits", ICML; the DR form of Saito et al. (2021), "Open Bandit Dataset and Pipeline",
    NeurIPS Datasets and Benchmarks.
    """

    tau: float = 10.0
    ridge: float = 1.0
    folds: int = 2
    reward_bounds: tuple[float, float] = (0.0, 1.0)
    name: ClassVar[str] = "switch-dr"

    def __post_init__(self) -> None:
        if not self.tau > 0:  # also refuses NaN; math.inf is DR
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        self._check_model()

    def rule(self) -> WeightRule:
        return Switch(self.tau)


@dataclass(frozen=True)
class DRos(WeightedDR):
    """DR with optimistic shrinkage of the weights.

    t_i = Σ_a π(a|x_i) r̂(x_{i,a}) + w̃_i (r_i − r̂(x_{i,a_i})), w̃ = λ w / (w² + λ): the
    weight that minimises a bound on the mean squared error when the model's error is
    bounded (λ large: DR; λ → 0: the direct method).  The bias, (1/n) Σ_i Σ_a π (w² /
    (w² + λ)) (E[r|x,a] − r̂), is bounded with the reward range and widens the interval
    (:func:`weighted_estimate`).  Su, Dimakopoulou, Krishnamurthy, Dudík (2020), "Doubly
    robust off-policy evaluation with shrinkage", ICML.
    """

    lam: float = 100.0
    ridge: float = 1.0
    folds: int = 2
    reward_bounds: tuple[float, float] = (0.0, 1.0)
    name: ClassVar[str] = "dros"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam must be a finite number > 0, got {self.lam!r}")
        self._check_model()

    def rule(self) -> WeightRule:
        return OptimisticShrinkage(self.lam)


@dataclass(frozen=True)
class SNDR(ModelBased):
    """Self-normalised DR: the DR correction divided by the mean weight.

    V̂ = (1/n) Σ_i Σ_a π(a|x_i) r̂(x_{i,a}) + Σ_i w_i (r_i − r̂(x_{i,a_i})) / Σ_i w_i.
    Biased for finite n but consistent, and never further from the direct method than the
    largest residual: stable where a few large weights would swing DR.  Interval by the
    delta method (:func:`self_normalised_dr`).  Needs μ(a|x) > 0 wherever π(a|x) > 0.
    Kallus & Uehara (2019), "Intrinsically efficient, stable, and bounded off-policy
    evaluation for reinforcement learning", NeurIPS; Swaminathan & Joachims (2015).
    """

    ridge: float = 1.0
    folds: int = 2
    name: ClassVar[str] = "sndr"

    def __post_init__(self) -> None:
        _check_ridge(self.ridge)
        _check_folds(self.folds)

    def with_predictions(
        self, log: LoggedBandit, pi: np.ndarray, predictions: np.ndarray
    ) -> Estimate:
        _require_support(log, pi, self.name)
        return self_normalised_dr(log, pi, predictions, self.name)


SELECT_TAUS = (100.0, 30.0, 10.0, 3.0)
SELECT_LAMBDAS = (1000.0, 100.0, 10.0)


@dataclass(frozen=True)
class NarrowestDR(ModelBased):
    """Estimator selection: of DR, SNDR, Switch-DR (τ in ``taus``) and DRos (λ in
    ``lambdas``), all on one reward model, the estimate with the narrowest 95% interval.

    The DR-family candidates' intervals hold their own bias bound (the corrections they
    drop or shrink, :func:`weighted_estimate`); SNDR's is the delta method's, valid as n
    grows.  Each is valid on its own, so the narrowest is the most informative; picking
    among nine correlated intervals costs little coverage (tests/test_ope.py checks it on
    20 seeds).  SLOPE (Su, Srinath, Krishnamurthy 2020,
    "Adaptive estimator selection for off-policy evaluation", ICML) instead orders the
    candidates by bias and applies Lepski's rule to their deviation intervals; on the
    simulator it always accepted the most biased candidate (Switch-DR at τ = 1, nearly
    the direct method) and answered with an interval about 1.0 wide, so this simpler rule
    is used.  The answer is named after the candidate chosen.
    """

    taus: tuple[float, ...] = SELECT_TAUS
    lambdas: tuple[float, ...] = SELECT_LAMBDAS
    ridge: float = 1.0
    folds: int = 2
    reward_bounds: tuple[float, float] = (0.0, 1.0)
    name: ClassVar[str] = "narrowest"

    def __post_init__(self) -> None:
        self.candidates()  # each candidate checks its own hyperparameters

    def candidates(self) -> list[ModelBased]:
        ridge, folds, bounds = self.ridge, self.folds, self.reward_bounds
        family: list[ModelBased] = [
            DR(ridge, folds=folds, reward_bounds=bounds),
            SNDR(ridge, folds),
        ]
        family += [SwitchDR(tau, ridge, folds, bounds) for tau in self.taus]
        family += [DRos(lam, ridge, folds, bounds) for lam in self.lambdas]
        return family

    def with_predictions(
        self, log: LoggedBandit, pi: np.ndarray, predictions: np.ndarray
    ) -> Estimate:
        answers = []
        for candidate in self.candidates():
            try:
                answers.append(candidate.with_predictions(log, pi, predictions))
            except EstimatorError:
                continue  # SNDR without support: the others still answer
        if not answers:
            raise EstimatorError(f"{self.name}: no candidate estimator could answer")
        chosen = min(answers, key=lambda e: e.upper - e.lower)
        return replace(chosen, name=f"{self.name}: {chosen.name}")


@dataclass(frozen=True)
class Replay(Estimator):
    """Replay on uniformly logged data, with expected matches instead of sampled ones.

    Li et al. keep the events where the target's choice equals the logged one and average
    their rewards.  Here event i counts with its expected number of matches under a
    uniform logger, m_i = π(a_i|x_i) · K_i, so no random draw adds noise:
    V̂ = Σ_i m_i r_i / Σ_i m_i (SNIPS with μ = 1/K_i).  For a deterministic target and equal
    K this is exactly the mean reward over the matched events, and the delta-method
    interval (:func:`ratio_estimate`) is the normal one over the matched rewards, up to
    the skew widening.  Raises if any event's ``pscore`` is not 1 / K_i.
    Li, Chu, Langford, Wang (2011), "Unbiased offline evaluation of contextual-bandit-based
    news article recommendation algorithms", WSDM.
    """

    name: ClassVar[str] = "replay"

    def _estimate(self, log: LoggedBandit, pi: np.ndarray) -> Estimate:
        uniform = np.repeat(1.0 / log.n_candidates, log.n_candidates)
        off = np.abs(log.pscore - uniform) > UNIFORM_TOLERANCE
        if off.any():
            row = int(np.flatnonzero(off)[0])
            event = event_of_row(log.offsets, row)
            raise EstimatorError(
                f"replay needs a uniform logging policy, but pscore of event {event} is "
                f"{log.pscore[log.offsets[event] : log.offsets[event + 1]].tolist()}"
            )
        matches = pi[log.chosen_rows] * log.n_candidates
        return ratio_estimate(matches, log.reward, self.name)


# -- policies as targets ---------------------------------------------------------------------


def _check_dim(policy: Policy, log: LoggedBandit) -> None:
    if policy.dim != log.dim:
        raise ValueError(f"policy has dim {policy.dim} but the log's X has d = {log.dim}")


def target_distribution(policy: Policy, log: LoggedBandit) -> np.ndarray:
    """π(a|x_i) for every candidate of every event, shape (N,), from a *static* policy.

    Calls ``policy.distribution(X_i, event_id_i)`` per event and never updates the policy.
    """
    _check_dim(policy, log)
    pi = np.empty(log.n_rows)
    bounds = log.offsets.tolist()
    distribution, X = policy.distribution, log.X
    for i, event_id in enumerate(log.event_id.tolist()):
        lo, hi = bounds[i], bounds[i + 1]
        pi[lo:hi] = distribution(X[lo:hi], event_id)
    return pi


ProgressiveEstimator = Literal["dr", "ips", "snips", "switch-dr", "dros", "sndr", "narrowest"]
PROGRESSIVE_ESTIMATORS: tuple[ProgressiveEstimator, ...] = (
    "dr",
    "ips",
    "snips",
    "switch-dr",
    "dros",
    "sndr",
    "narrowest",
)


def estimator_named(
    estimator: ProgressiveEstimator,
    *,
    clip: float | None = None,
    ridge: float = 1.0,
    reward_bounds: tuple[float, float] = (0.0, 1.0),
) -> Estimator:
    """The estimator a tuning config names, with its defaults; ``clip`` only for IPS / DR."""
    if clip is not None and estimator not in ("ips", "dr"):
        raise ValueError(f"clip applies to estimator 'ips' or 'dr', not {estimator!r}")
    if estimator == "ips":
        return IPS(clip, reward_bounds)
    if estimator == "dr":
        return DR(ridge, clip, reward_bounds=reward_bounds)
    if estimator == "snips":
        return SNIPS()
    if estimator == "switch-dr":
        return SwitchDR(ridge=ridge, reward_bounds=reward_bounds)
    if estimator == "dros":
        return DRos(ridge=ridge, reward_bounds=reward_bounds)
    if estimator == "sndr":
        return SNDR(ridge=ridge)
    if estimator == "narrowest":
        return NarrowestDR(ridge=ridge, reward_bounds=reward_bounds)
    raise ValueError(f"estimator must be one of {list(PROGRESSIVE_ESTIMATORS)}, got {estimator!r}")


def progressive(
    policy: Policy,
    log: LoggedBandit,
    *,
    estimator: ProgressiveEstimator = "dr",
    clip: float | None = None,
    ridge: float = 1.0,
    reward_bounds: tuple[float, float] = (0.0, 1.0),
) -> Estimate:
    """Progressive validation of a *learning* policy, in the log's time order.

    For each event i: π_i = ``policy.distribution(X_i)`` *before* it learns from event i,
    then ``policy.update(x_{i,a_i}, r_i)`` (at the event's time, which a forgetting
    policy weighs the reward by).  The estimator's per-event term uses π_i, so
    each term is unbiased for V(π_i) given the past, and V̂ estimates (1/n) Σ_i V(π_i): what
    the policy would have earned while learning from this log.  ``clip``, ``ridge`` and
    ``reward_bounds`` mean what they mean for :class:`IPS` / :class:`DR`; for the
    model-based estimators (:class:`ModelBased`) the reward model is progressive too
    (:func:`online_predictions`: earlier events only).  ``policy`` is updated in place.
    Blum, Kalai, Langford (1999), "Beating the hold-out: bounds for k-fold and progressive
    cross-validation", COLT.

    The loop (:meth:`Policy.replay`) does only what the policy itself must, one
    distribution and one update per event; all estimator arithmetic is vectorised after it.
    """
    spec = estimator_named(estimator, clip=clip, ridge=ridge, reward_bounds=reward_bounds)
    _check_dim(policy, log)

    pi = policy.replay(
        log.X, log.offsets, log.chosen_rows, log.reward, log.event_id.tolist(), log.seconds()
    )

    if isinstance(spec, ModelBased):
        pi = check_distribution(pi, log.offsets, "action_dist")
        result = replace(
            spec.with_predictions(log, pi, online_predictions(log, spec.ridge)),
            diagnostics=diagnose(log, pi),
        )
    else:
        result = spec.estimate(log, pi)
    return replace(result, name=f"progressive {result.name}")
