"""Contextual-bandit policies over joint candidate features (plain numpy, no Ray).

Candidates change with every request, so every policy here shares one linear model over
the joint vector x of a candidate (see :mod:`tipgraph.features`), like Vowpal Wabbit's
action-dependent features.  The learned state is the additive sufficient statistics of
ridge regression (:class:`RidgeStats`), so two models trained on disjoint data merge
exactly: ``merge(A, B)`` equals training one model on the union.

Every policy answers with a probability for *every* candidate (non-negative, summing to
one), so each logged decision carries the propensities off-policy evaluation needs.  All
but ``uniform`` mix in an exploration floor: p ← (1 − ε) p + ε / K, so every candidate has
probability at least ε / K.  The draw uses a generator seeded from the event id and the
policy name: the same event replays the same decision.

API, scikit-learn style: configure in the constructor, learn with :meth:`Policy.update`
(returns ``self``), ask with :meth:`Policy.distribution` / :meth:`Policy.decide`.  Inputs
are checked once, by :func:`check_matrix` / :func:`check_vector`.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import struct
from collections.abc import Sequence
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import numpy as np
from pydantic import ValidationError

from tipgraph.compiled_replay import KIND_CODES, ridge_kernel
from tipgraph.features import FEATURE_SPEC, upgrade_from
from tipgraph.settings import (
    BaselineSettings,
    EpsilonGreedySettings,
    ExplorationSettings,
    LinearModelSettings,
    LinTSSettings,
    LinUCBSettings,
    PolicySettings,
    SoftmaxSettings,
    SquareCBSettings,
    UniformSettings,
    parse_policy,
    policy_fields,
)

FORMAT_MAGIC = b"TGPOLICY"
FORMAT_VERSION = 2
"""2: the header holds only the kind's own settings.  1: every kind's settings, one bag."""
UNUSED_RIDGE = 1.0
"""The prior of the statistics a policy keeps but never decides with (uniform, baseline)."""
UNSPECIFIED_SPEC = "unspecified"


class PolicyInputError(ValueError):
    """Features of the wrong shape or with NaN / infinite values."""


class PolicyStateError(ValueError):
    """A serialised state that cannot be used: corrupt, or made for other features."""


def check_matrix(X: object, dim: int) -> np.ndarray:
    """X as a float array of shape (n_candidates >= 1, dim) with finite values."""
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] == 0:
        raise PolicyInputError(
            f"X must be an array of shape (n_candidates >= 1, {dim}), got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise PolicyInputError("X contains NaN or infinite values")
    return arr


def check_vector(x: object, dim: int) -> np.ndarray:
    """x as a float array of shape (dim,) with finite values."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != (dim,):
        raise PolicyInputError(f"x must be an array of shape ({dim},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise PolicyInputError("x contains NaN or infinite values")
    return arr


def event_seed(event_id: str, policy_name: str) -> int:
    """A 64-bit seed determined by (event, policy): the same decision replays identically."""
    digest = hashlib.sha256(f"{event_id}\x1f{policy_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def draw(p: np.ndarray, seed: int) -> int:
    """Inverse-CDF draw from ``p`` with the uniform number ``seed / 2**64``.

    One number is all a draw needs; building a numpy Generator per event would cost more
    than scoring the candidates.  Candidates with probability 0 are never drawn.
    """
    cdf = p.cumsum()
    index = int(cdf.searchsorted(seed * (cdf[-1] / 2.0**64), "right"))
    if index >= len(p) or p[index] <= 0:  # only reachable through float rounding at the top
        index = int(np.flatnonzero(p > 0)[-1])
    return index


def softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    e = np.exp((z - z.max()) / temperature)
    return e / e.sum()


def argmax_mass(scores: np.ndarray) -> np.ndarray:
    """All probability on the best score; exact ties share it, so the answer is defined."""
    best = int(scores.argmax())
    ties = scores >= scores[best] - 1e-12
    n_ties = int(np.count_nonzero(ties))
    if n_ties > 1:
        return ties / n_ties
    p = np.zeros(len(scores))
    p[best] = 1.0
    return p


def with_floor(p: np.ndarray, epsilon: float) -> np.ndarray:
    """Mix with uniform so every candidate keeps probability >= epsilon / K (in place)."""
    p *= 1.0 - epsilon
    p += epsilon / len(p)
    return p


class Decision(NamedTuple):
    """Scores and probabilities, arrays of shape (n_candidates,), and the drawn index."""

    scores: np.ndarray
    probabilities: np.ndarray
    chosen: int

    @property
    def chosen_probability(self) -> float:
        return float(self.probabilities[self.chosen])


class RidgeStats:
    """Sufficient statistics of ridge regression, additive across data shards.

    ``gram_`` = Σ xxᵀ and ``b_`` = Σ r x (the prior λI is kept out of them, so merging
    never counts it twice); A = λI + gram.  ``A_inv_`` follows each update by the
    Sherman–Morrison identity, (A + xxᵀ)⁻¹ = A⁻¹ − A⁻¹xxᵀA⁻¹ / (1 + xᵀA⁻¹x), in O(d²)
    instead of O(d³), and is recomputed exactly after a merge and every
    ``refresh_every`` updates so rounding never accumulates.

    Decisions need only A⁻¹ and b, so the xxᵀ of recent updates are folded into ``gram_``
    in one matrix product when it is read, not one outer product per update.
    """

    def __init__(self, dim: int, ridge: float, refresh_every: int = 1024) -> None:
        self.dim = dim
        self.ridge = ridge
        self.refresh_every = refresh_every
        self._gram = np.zeros((dim, dim))
        self._unfolded: list[np.ndarray] = []
        self.b_ = np.zeros(dim)
        self.n_ = 0
        self.A_inv_ = np.eye(dim) / ridge
        self._theta: np.ndarray | None = None
        self._since_refresh = 0

    @property
    def gram_(self) -> np.ndarray:
        if self._unfolded:
            rows = np.asarray(self._unfolded)
            self._gram += rows.T @ rows
            self._unfolded.clear()
        return self._gram

    @property
    def A(self) -> np.ndarray:
        return self.gram_ + self.ridge * np.eye(self.dim)

    @property
    def theta(self) -> np.ndarray:
        """Ridge estimate A⁻¹b, cached until the next update."""
        if self._theta is None:
            self._theta = self.A_inv_ @ self.b_
        return self._theta

    def update(self, x: np.ndarray, reward: float, at: float | None = None) -> None:
        """Learn one reward; ``at`` (its time) is for the decayed variant's interface."""
        self._unfolded.append(x.copy())  # the caller may reuse its array
        self.b_ += reward * x
        self.n_ += 1
        self._theta = None
        self._since_refresh += 1
        if self._since_refresh >= self.refresh_every:
            self.refresh()
            return
        Ax = self.A_inv_ @ x
        # Scale the vector, not the d x d outer product: one matrix pass fewer.
        self.A_inv_ -= np.outer(Ax, Ax / (1.0 + x @ Ax))

    def load_replayed(
        self, gram: np.ndarray, A_inv: np.ndarray, b: np.ndarray, n: int, since_refresh: int
    ) -> None:
        """Take the state a compiled replay of ``n`` more updates left (compiled_replay)."""
        self._gram, self._unfolded, self.A_inv_, self.b_ = gram, [], A_inv, b
        self.n_ += n
        self._since_refresh = since_refresh
        self._theta = None

    def add(self, gram: np.ndarray, b: np.ndarray, n: int) -> None:
        """Add another shard's statistics; the merged model is exact, not approximate."""
        self._gram = self.gram_ + gram
        self.b_ += b
        self.n_ += n
        self.refresh()

    def refresh(self) -> None:
        self.A_inv_ = np.linalg.inv(self.A)
        self._theta = None
        self._since_refresh = 0


ANCHOR_STEP = 64
"""Half-lives between the anchors of :class:`DecayedRidgeStats`: stored weights stay
within 2^±64 of 1, far from float overflow, however long the model runs."""


def _power_of_two(exponent: float, anchor: int) -> float:
    """2^(exponent − anchor), computed so that it depends on ``anchor`` only through an
    exact power of two: the same reward gets bit-identical weights under every anchor."""
    whole = math.floor(exponent)
    return math.ldexp(2.0 ** (exponent - whole), whole - anchor)


class DecayedRidgeStats:
    """Ridge statistics that forget: each reward's weight halves every ``half_life_s``.

    Forward decay (Cormode, Shkapenyuk, Srivastava, Xu 2009, "Forward decay: a practical
    time decay model for streaming systems", ICDE): a reward at time t (Unix seconds)
    enters with weight g(t) = 2^(t/h) against the fixed epoch 0, so G = Σ g(t_i) x xᵀ and
    B = Σ g(t_i) r x depend only on the rewards' own times.  The sums are the same in any
    order, merge by addition, and a replica rebuilt from the rewards log holds what one
    that ran all along holds.  The model answers as of T = the latest reward time (also
    order-free): gram = G / g(T), b = B / g(T), so a reward counts 2^(−(T − t)/h).

    G and B are kept relative to an anchor 2^(k · ANCHOR_STEP), k from T; moving it
    multiplies by a power of two, which is exact.  A⁻¹ is recomputed when read after a
    change (O(d³)): every new latest time rescales every weight.
    """

    def __init__(self, dim: int, ridge: float, half_life_s: float) -> None:
        self.dim = dim
        self.ridge = ridge
        self.half_life_s = half_life_s
        self._G = np.zeros((dim, dim))
        self._B = np.zeros(dim)
        self._anchor = 0
        self.latest_ = -math.inf
        self.n_ = 0
        self._view: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._theta: np.ndarray | None = None

    def _reanchor(self, exponent: float) -> None:
        anchor = math.floor(exponent / ANCHOR_STEP) * ANCHOR_STEP
        if anchor > self._anchor:
            scale = math.ldexp(1.0, self._anchor - anchor)
            self._G *= scale
            self._B *= scale
            self._anchor = anchor

    def update(self, x: np.ndarray, reward: float, at: float | None = None) -> None:
        if at is None or not math.isfinite(at):
            raise PolicyInputError(
                f"a policy with half_life_s needs each reward's time (Unix seconds), got {at}"
            )
        if at > self.latest_:
            self.latest_ = at
            self._reanchor(at / self.half_life_s)
        w = _power_of_two(at / self.half_life_s, self._anchor)
        self._G += np.outer(w * x, x)
        self._B += (w * reward) * x
        self.n_ += 1
        self._view = None
        self._theta = None

    def _normalised(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gram, b, A⁻¹) as of the latest reward."""
        if self._view is None:
            if self.n_ == 0:
                gram, b = np.zeros((self.dim, self.dim)), np.zeros(self.dim)
            else:
                f = 1.0 / _power_of_two(self.latest_ / self.half_life_s, self._anchor)
                gram, b = self._G * f, self._B * f
            A_inv = np.linalg.inv(gram + self.ridge * np.eye(self.dim))
            self._view = (gram, b, A_inv)
        return self._view

    @property
    def gram_(self) -> np.ndarray:
        return self._normalised()[0]

    @property
    def b_(self) -> np.ndarray:
        return self._normalised()[1]

    @property
    def A_inv_(self) -> np.ndarray:
        return self._normalised()[2]

    @property
    def theta(self) -> np.ndarray:
        """Ridge estimate A⁻¹b as of the latest reward, cached until the next update."""
        if self._theta is None:
            self._theta = self.A_inv_ @ self.b_
        return self._theta

    def refresh(self) -> None:
        self._view = None
        self._theta = None

    def load(self, gram: np.ndarray, b: np.ndarray, n: int, latest: float) -> None:
        """Take a state saved as of ``latest`` (:meth:`gram_`, :meth:`b_`)."""
        self.latest_ = latest
        self._anchor = 0
        if math.isfinite(latest):
            self._reanchor(latest / self.half_life_s)
            g = _power_of_two(latest / self.half_life_s, self._anchor)
            self._G, self._B = gram * g, b * g
        else:
            self._G, self._B = gram.copy(), b.copy()
        self.n_ = n
        self.refresh()

    def merge(self, other: DecayedRidgeStats) -> None:
        """Add another replica's or shard's rewards: the same as having applied them."""
        if other.half_life_s != self.half_life_s:
            raise PolicyStateError(
                f"cannot merge states with half-lives {other.half_life_s} s and "
                f"{self.half_life_s} s"
            )
        if other.n_ == 0:
            return
        self.latest_ = max(self.latest_, other.latest_)
        self._reanchor(self.latest_ / self.half_life_s)
        scale = math.ldexp(1.0, other._anchor - self._anchor)
        self._G += other._G * scale
        self._B += other._B * scale
        self.n_ += other.n_
        self.refresh()


S = TypeVar("S", bound=PolicySettings)


class Policy(abc.ABC, Generic[S]):
    """A contextual-bandit policy over joint candidate features of dimension ``dim``.

    ``settings`` is the kind's own settings class.  ``spec_version`` names the feature
    layout the state was learned on; a state is never loaded into or merged with a policy
    of another layout.
    """

    kind: ClassVar[str]
    seeded: ClassVar[bool] = False
    """Whether the distribution itself depends on the event's seed (sampling policies)."""

    def __init__(self, settings: S, dim: int, *, spec_version: str = UNSPECIFIED_SPEC) -> None:
        if settings.kind != self.kind:
            raise ValueError(
                f"{type(self).__name__} needs kind {self.kind!r}, got {settings.kind!r}"
            )
        self.settings = settings
        self.dim = dim
        self.spec_version = spec_version
        self.epsilon = settings.epsilon if isinstance(settings, ExplorationSettings) else 0.0
        model = settings if isinstance(settings, LinearModelSettings) else None
        self.stats_: RidgeStats | DecayedRidgeStats
        if model is not None and model.half_life_s is not None:
            self.stats_ = DecayedRidgeStats(dim, model.ridge, model.half_life_s)
        elif model is not None:
            self.stats_ = RidgeStats(dim, model.ridge, model.refresh_every)
        else:
            self.stats_ = RidgeStats(dim, UNUSED_RIDGE)
        self._mask: np.ndarray | None = None
        if model and model.features is not None:
            if dim != FEATURE_SPEC.dim:
                raise ValueError(
                    f"features {list(model.features)} name groups of tipgraph's own feature "
                    f"layout (dim {FEATURE_SPEC.dim}); this policy has dim {dim}"
                )
            self._mask = FEATURE_SPEC.mask(model.features)
        # Settings are frozen: hash them once, not on every decision.  They hold only the
        # kind's own hyperparameters, so nothing the policy never reads changes its version.
        params = json.dumps(settings.model_dump(mode="json"), sort_keys=True)
        self._params_digest = hashlib.sha256(f"{params}|{dim}|{spec_version}".encode()).hexdigest()[
            :8
        ]

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def forgets(self) -> bool:
        """Whether the policy weighs rewards by their time (``half_life_s``)."""
        return isinstance(self.stats_, DecayedRidgeStats)

    @property
    def n_updates(self) -> int:
        return self.stats_.n_

    @property
    def version(self) -> str:
        """Hyperparameters + number of updates: identifies the model that decided."""
        return f"{self.kind}-{self._params_digest}.{self.n_updates}"

    # -- what each policy defines -----------------------------------------------------------
    @abc.abstractmethod
    def _scores(self, X: np.ndarray) -> np.ndarray:
        """Array of shape (n_candidates,): higher is better."""

    @abc.abstractmethod
    def _greedy_distribution(self, X: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        """The distribution before the exploration floor is mixed in; ``seed`` is the
        event's, for policies whose distribution is itself estimated by sampling."""

    # -- public API ---------------------------------------------------------------------------
    def _features(self, X: np.ndarray) -> np.ndarray:
        return X if self._mask is None else X * self._mask

    def scores(self, X: object) -> np.ndarray:
        return self._scores(self._features(check_matrix(X, self.dim)))

    def distribution(self, X: object, event_id: str = "") -> np.ndarray:
        """Probability of choosing each candidate, array of shape (n_candidates,)."""
        return self._decide(self._features(check_matrix(X, self.dim)), event_id).probabilities

    def decide(self, X: object, event_id: str) -> Decision:
        """Scores, probabilities, and one candidate drawn from them, replayable per event."""
        return self._decide(self._features(check_matrix(X, self.dim)), event_id)

    def _decide(self, X: np.ndarray, event_id: str) -> Decision:
        seed = event_seed(event_id, self.name)
        scores = self._scores(X)
        p = self._greedy_distribution(X, scores, seed)
        if self.epsilon:
            p = with_floor(p, self.epsilon)
        return Decision(scores, p, draw(p, seed))

    def replay(
        self,
        X: object,
        offsets: np.ndarray,
        chosen_rows: np.ndarray,
        rewards: np.ndarray,
        event_ids: Sequence[str],
        times: np.ndarray | None = None,
        *,
        reference: bool = False,
    ) -> np.ndarray:
        """Progressive replay of a log: each event's distribution *before* learning from it.

        Event i owns rows ``offsets[i]:offsets[i+1]`` of ``X`` (shape (N, d)); the policy
        gives their probabilities, then learns ``rewards[i]`` for row ``chosen_rows[i]``.
        Returns the probabilities, shape (N,).  The same as calling :meth:`distribution`
        and :meth:`update` per event, with the inputs checked once for the whole log
        instead of once per call, and no draw (nothing is served).  ``times`` (Unix
        seconds, shape (n,)) are the rewards' times, which a policy with ``half_life_s``
        needs.

        LinUCB, ε-greedy, softmax and SquareCB without ``half_life_s`` run the loop
        compiled (tipgraph/compiled_replay.py); the rest, and every policy with
        ``reference=True``, run it in numpy, one event at a time as serving decides and
        learns: the reference the compiled loop is tested against.
        """
        features = self._features(check_matrix(X, self.dim))
        bounds = np.asarray(offsets, dtype=np.int64)
        n = len(bounds) - 1
        rows = np.asarray(chosen_rows, dtype=np.int64)
        r = np.asarray(rewards, dtype=np.float64)
        if n < 1 or bounds[0] != 0 or bounds[-1] != len(features) or (np.diff(bounds) < 1).any():
            raise PolicyInputError("offsets must rise from 0 to len(X) by >= 1 per event")
        if rows.shape != (n,) or r.shape != (n,) or len(event_ids) != n:
            raise PolicyInputError(f"chosen_rows, rewards and event_ids need {n} entries")
        if not np.isfinite(r).all():
            raise PolicyInputError("rewards contain NaN or infinite values")
        if ((rows < bounds[:-1]) | (rows >= bounds[1:])).any():
            raise PolicyInputError("every chosen row must lie inside its own event")
        at: list[float | None] = [None] * n
        if times is not None:
            t = np.asarray(times, dtype=np.float64)
            if t.shape != (n,) or not np.isfinite(t).all():
                raise PolicyInputError(f"times need {n} finite entries")
            at = list(t.tolist())
        if not reference and self._compiled_replay():
            return self._replay_compiled(features, bounds, rows, r)
        return self._replay_loop(features, bounds, rows, r, event_ids, at)

    def _replay_loop(
        self,
        features: np.ndarray,
        bounds: np.ndarray,
        rows: np.ndarray,
        r: np.ndarray,
        event_ids: Sequence[str],
        at: list[float | None],
    ) -> np.ndarray:
        pi = np.empty(len(features))
        scores, greedy, update = self._scores, self._greedy_distribution, self.stats_.update
        epsilon, name, seeded = self.epsilon, self.name, self.seeded
        edges = bounds.tolist()
        for i, (event_id, row, reward) in enumerate(
            zip(event_ids, rows.tolist(), r.tolist(), strict=True)
        ):
            block = features[edges[i] : edges[i + 1]]
            p = greedy(block, scores(block), event_seed(event_id, name) if seeded else 0)
            pi[edges[i] : edges[i + 1]] = with_floor(p, epsilon) if epsilon else p
            update(features[row], reward, at[i])
        return pi

    def _compiled_replay(self) -> bool:
        """Whether the compiled loop computes exactly this policy: one of its kinds, on
        statistics that keep everything, and not a subclass that decides otherwise."""
        return (
            self.kind in KIND_CODES
            and type(self) is POLICY_CLASSES[self.kind]
            and isinstance(self.stats_, RidgeStats)
        )

    def _replay_compiled(
        self, features: np.ndarray, bounds: np.ndarray, rows: np.ndarray, r: np.ndarray
    ) -> np.ndarray:
        stats = self.stats_
        assert isinstance(stats, RidgeStats)
        gram, A_inv, b = stats.gram_.copy(), stats.A_inv_.copy(), stats.b_.copy()
        pi, since_refresh = ridge_kernel()(
            np.ascontiguousarray(features),
            bounds,
            rows,
            r,
            A_inv,
            gram,
            b,
            float(stats.ridge),
            int(stats.refresh_every),
            int(stats._since_refresh),
            KIND_CODES[self.kind],
            float(getattr(self.settings, "alpha", 0.0)),
            float(getattr(self.settings, "temperature", 1.0)),
            float(getattr(self.settings, "gamma", 0.0)),
            float(self.epsilon),
        )
        stats.load_replayed(gram, A_inv, b, len(rows), since_refresh)
        return np.asarray(pi)

    def update(self, x: object, reward: float, at: float | None = None) -> Policy[S]:
        """Learn ``reward`` for features ``x``; ``at`` is the reward's time (Unix seconds),
        which only a policy with ``half_life_s`` reads, and needs."""
        if not math.isfinite(reward):
            raise PolicyInputError(f"reward must be finite, got {reward}")
        self.stats_.update(self._features(check_vector(x, self.dim)), float(reward), at)
        return self

    def merge(self, other: Policy[Any]) -> Policy[S]:
        """Add ``other``'s learned statistics to this policy's (any kind, same features)."""
        if (other.dim, other.spec_version) != (self.dim, self.spec_version):
            raise PolicyStateError(
                f"cannot merge a state of dim {other.dim} / features {other.spec_version} "
                f"into dim {self.dim} / features {self.spec_version}"
            )
        mine, theirs = self.stats_, other.stats_
        if isinstance(mine, DecayedRidgeStats) or isinstance(theirs, DecayedRidgeStats):
            if not (isinstance(mine, DecayedRidgeStats) and isinstance(theirs, DecayedRidgeStats)):
                raise PolicyStateError("cannot merge a forgetting state with one that keeps all")
            mine.merge(theirs)
        else:
            mine.add(theirs.gram_, theirs.b_, theirs.n_)
        return self

    def to_bytes(self) -> bytes:
        """Statistics + hyperparameters + feature-spec version; no pickle, safe to load."""
        header = json.dumps(
            {
                "format": FORMAT_VERSION,
                "settings": self.settings.model_dump(mode="json"),
                "dim": self.dim,
                "spec_version": self.spec_version,
                "n": self.stats_.n_,
                **(
                    {"latest": _finite_or_none(self.stats_.latest_)}
                    if isinstance(self.stats_, DecayedRidgeStats)
                    else {}
                ),
            },
            sort_keys=True,
        ).encode()
        body = self.stats_.gram_.astype("<f8").tobytes() + self.stats_.b_.astype("<f8").tobytes()
        return FORMAT_MAGIC + struct.pack("<I", len(header)) + header + body

    @classmethod
    def from_bytes(cls, data: bytes, *, expected_spec_version: str | None = None) -> Policy[Any]:
        """The inverse of :meth:`to_bytes`; see :func:`policy_from_bytes`."""
        policy = policy_from_bytes(data, expected_spec_version=expected_spec_version)
        if cls is not Policy and not isinstance(policy, cls):
            raise PolicyStateError(f"state holds a {policy.kind!r} policy, not {cls.kind!r}")
        return policy


class LinUCB(Policy[LinUCBSettings]):
    """Optimism under uncertainty on the shared ridge model.

    score_i = θᵀx_i + α √(x_iᵀ A⁻¹ x_i); all mass on the best score, then the ε floor.
    Li, Chu, Langford, Schapire (2010), "A contextual-bandit approach to personalized news
    article recommendation", WWW.
    """

    kind = "linucb"

    def _scores(self, X: np.ndarray) -> np.ndarray:
        XA = X @ self.stats_.A_inv_
        # θ̂ᵀx = xᵀA⁻¹b: reuse X A⁻¹, which the width needs anyway.
        mean = XA @ self.stats_.b_
        width = np.einsum("ij,ij->i", XA, X)
        return mean + self.settings.alpha * np.sqrt(np.maximum(width, 0.0))

    def _greedy_distribution(self, X: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        return argmax_mass(scores)


class LinearThompson(Policy[LinTSSettings]):
    """Thompson sampling from the Gaussian posterior θ̃ ~ N(θ̂, v² A⁻¹).

    The probability of each candidate is estimated by ``ts_draws`` posterior draws (the
    share of draws in which it is best), and the served candidate is drawn from that
    estimate, so the logged propensity is exactly the probability it was served with.
    Agrawal & Goyal (2013), "Thompson sampling for contextual bandits with linear
    payoffs", ICML.
    """

    kind = "lints"
    seeded = True

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return X @ self.stats_.theta

    def _greedy_distribution(self, X: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        # Only the K candidate scores matter, and under the posterior they are jointly
        # Gaussian: N(X θ̂, v² X A⁻¹ Xᵀ).  Sampling them directly costs K·d² + K³ instead
        # of the d³ + draws·d² of sampling θ̃ in d dimensions, with the same law.
        rng = np.random.default_rng([seed, 1])  # its own stream: the served draw uses seed
        cov = (self.settings.v**2) * (X @ self.stats_.A_inv_ @ X.T)
        # eigh, not Cholesky: X A⁻¹ Xᵀ is singular whenever candidates repeat.
        w, V = np.linalg.eigh((cov + cov.T) / 2)
        factor = V * np.sqrt(np.maximum(w, 0.0))
        draws = scores + rng.standard_normal((self.settings.ts_draws, len(X))) @ factor.T
        winners = np.argmax(draws, axis=1)
        return np.bincount(winners, minlength=len(X)) / self.settings.ts_draws


class EpsilonGreedy(Policy[EpsilonGreedySettings]):
    """Greedy on the ridge estimate θᵀx; exploration is the ε floor alone."""

    kind = "egreedy"

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return X @ self.stats_.theta

    def _greedy_distribution(self, X: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        return argmax_mass(scores)


class Softmax(Policy[SoftmaxSettings]):
    """Boltzmann exploration: p ∝ exp(θᵀx / τ), then the ε floor."""

    kind = "softmax"

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return X @ self.stats_.theta

    def _greedy_distribution(self, X: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        return softmax(scores, self.settings.temperature)


class SquareCB(Policy[SquareCBSettings]):
    """Inverse-gap weighting over predicted rewards ŷ = θᵀx, in closed form.

    With b the best candidate and K candidates: p_a = 1 / (K + γ (ŷ_b − ŷ_a)) for a ≠ b,
    and p_b = 1 − Σ_{a≠b} p_a.  Foster & Rakhlin (2020), "Beyond UCB: optimal and efficient
    contextual bandits with regression oracles", ICML.
    """

    kind = "squarecb"

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return X @ self.stats_.theta

    def _greedy_distribution(self, X: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        best = int(np.argmax(scores))
        p = 1.0 / (len(scores) + self.settings.gamma * (scores[best] - scores))
        p[best] = 0.0
        p[best] = 1.0 - p.sum()
        return p


class Uniform(Policy[UniformSettings]):
    """Every candidate equally likely: the logging policy that makes replay evaluation
    unbiased, and the reference every learner must beat.  No floor needed."""

    kind = "uniform"

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return np.zeros(len(X))

    def _greedy_distribution(self, X: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        return np.full(len(X), 1.0 / len(X))


class FixedOrder(Policy[BaselineSettings]):
    """The rule-based baseline: the candidate generation put first, plus the ε floor.

    It learns statistics (so it can be merged and compared) but never uses them.
    """

    kind = "baseline"

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return -np.arange(len(X), dtype=np.float64)

    def _greedy_distribution(self, X: np.ndarray, scores: np.ndarray, seed: int) -> np.ndarray:
        p = np.zeros(len(X))
        p[0] = 1.0
        return p


POLICY_CLASSES: dict[str, type[Policy[Any]]] = {
    cls.kind: cls
    for cls in (LinUCB, LinearThompson, EpsilonGreedy, Softmax, SquareCB, Uniform, FixedOrder)
}


def make_policy(
    settings: PolicySettings, dim: int, *, spec_version: str = UNSPECIFIED_SPEC
) -> Policy[Any]:
    return POLICY_CLASSES[settings.kind](settings, dim, spec_version=spec_version)


def stored_settings(header: dict[str, Any]) -> PolicySettings:
    """The settings a state header holds, in either format.

    Format 1 stored every kind's hyperparameters in one bag, defaults included; the kind
    read only its own, so the others are dropped (they never changed a decision).  A
    consequence: a format-1 state loads with a new ``version`` digest, which covers only
    the kind's own settings.
    """
    settings = dict(header.get("settings") or {})
    if header.get("format") == 1 and "kind" in settings:
        try:
            own = policy_fields(str(settings["kind"]))
        except KeyError as err:
            raise PolicyStateError(f"unknown policy kind {settings['kind']!r}") from err
        settings = {k: v for k, v in settings.items() if k in own}
    try:
        return parse_policy(settings)
    except ValidationError as err:
        raise PolicyStateError(f"policy state settings are invalid: {err}") from err


def policy_from_bytes(data: bytes, *, expected_spec_version: str | None = None) -> Policy[Any]:
    """Load :meth:`Policy.to_bytes` output; refuse a state learned on other features."""
    if not data.startswith(FORMAT_MAGIC) or len(data) < len(FORMAT_MAGIC) + 4:
        raise PolicyStateError("not a tipgraph policy state (bad magic)")
    offset = len(FORMAT_MAGIC)
    (header_len,) = struct.unpack("<I", data[offset : offset + 4])
    offset += 4
    try:
        header = json.loads(data[offset : offset + header_len])
    except ValueError as err:
        raise PolicyStateError("policy state header is not valid JSON") from err
    if header.get("format") not in (1, FORMAT_VERSION):
        raise PolicyStateError(f"unsupported policy state format {header.get('format')!r}")
    spec = header["spec_version"]
    upgrade = None
    if expected_spec_version is not None and spec != expected_spec_version:
        if expected_spec_version == FEATURE_SPEC.version:
            upgrade = upgrade_from(spec)
        if upgrade is None:
            raise PolicyStateError(
                f"policy state was learned on features {spec}, but this server uses "
                f"{expected_spec_version}; retrain or register a model for these features"
            )
    dim = int(header["dim"])
    body = np.frombuffer(data[offset + header_len :], dtype="<f8")
    if body.size != dim * dim + dim:
        raise PolicyStateError(
            f"policy state body has {body.size} values, expected {dim * dim + dim}"
        )
    gram, b, n = (
        body[: dim * dim].reshape(dim, dim).copy(),
        body[dim * dim :].copy(),
        int(header["n"]),
    )
    if upgrade is not None:
        if dim != upgrade.source.dim:
            raise PolicyStateError(f"policy state of features {spec} has dim {dim}")
        # Learned on an earlier layout: carried over, the features added since at 0.
        gram, b = upgrade.gram(gram), upgrade.vector(b)
        dim, spec = upgrade.target.dim, upgrade.target.version
    policy = make_policy(stored_settings(header), dim, spec_version=spec)
    if isinstance(policy.stats_, DecayedRidgeStats):
        latest = header.get("latest")
        policy.stats_.load(gram, b, n, -math.inf if latest is None else float(latest))
    else:
        policy.stats_.add(gram, b, n)
    return policy


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
