"""Contextual-bandit policies over joint candidate features (plain numpy, no Ray).

Every policy answers with a probability for *every* candidate, so each logged decision
carries the propensities that off-policy evaluation needs.  Sampling uses a generator
seeded from the event id, so a decision can be replayed exactly from the log.

API, scikit-learn style: configure in the constructor, learn with :meth:`update`
(returns ``self``), ask with :meth:`distribution` / :meth:`decide`.  Inputs are checked
once in :func:`check_matrix` / :func:`check_vector`.

Reference for LinUCB: Li, Chu, Langford, Schapire (2010), "A contextual-bandit approach to
personalized news article recommendation", WWW.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from tipgraph.settings import PolicySettings


class PolicyInputError(ValueError):
    """Features of the wrong shape or with NaN / infinite values."""


def check_matrix(X: object, dim: int) -> np.ndarray:
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] == 0:
        raise PolicyInputError(
            f"X must be an array of shape (n_candidates >= 1, {dim}), got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise PolicyInputError("X contains NaN or infinite values")
    return arr


def check_vector(x: object, dim: int) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.shape != (dim,):
        raise PolicyInputError(f"x must be an array of shape ({dim},), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise PolicyInputError("x contains NaN or infinite values")
    return arr


def event_rng(event_id: str, policy_name: str) -> np.random.Generator:
    """A generator determined by (event, policy): the same decision replays identically."""
    digest = hashlib.sha256(f"{event_id}\x1f{policy_name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    shifted = (z - z.max()) / temperature
    e = np.exp(shifted)
    return e / e.sum()


def with_floor(p: np.ndarray, epsilon: float) -> np.ndarray:
    """Mix with uniform so every candidate keeps probability >= epsilon / K."""
    return (1.0 - epsilon) * p + epsilon / len(p)


@dataclass(frozen=True)
class Decision:
    scores: np.ndarray
    probabilities: np.ndarray
    chosen: int

    @property
    def chosen_probability(self) -> float:
        return float(self.probabilities[self.chosen])


class RidgeStats:
    """Additive sufficient statistics of ridge regression: A = λI + Σ xxᵀ, b = Σ r x.

    ``A_inv`` is kept current by Sherman–Morrison rank-one updates, O(d²) per update
    instead of O(d³) for a fresh inverse.
    """

    def __init__(self, dim: int, ridge: float) -> None:
        self.dim = dim
        self.ridge = ridge
        self.A_ = ridge * np.eye(dim)
        self.b_ = np.zeros(dim)
        self.A_inv_ = np.eye(dim) / ridge
        self.n_updates_ = 0

    def update(self, x: np.ndarray, reward: float) -> None:
        self.A_ += np.outer(x, x)
        self.b_ += reward * x
        Ax = self.A_inv_ @ x
        self.A_inv_ -= np.outer(Ax, Ax) / (1.0 + x @ Ax)
        self.n_updates_ += 1

    @property
    def theta(self) -> np.ndarray:
        return self.A_inv_ @ self.b_


class Policy(abc.ABC):
    """A contextual-bandit policy over joint candidate features of dimension ``dim``."""

    def __init__(self, settings: PolicySettings, dim: int) -> None:
        self.settings = settings
        self.dim = dim
        self.stats_ = RidgeStats(dim, settings.ridge)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def n_updates(self) -> int:
        return self.stats_.n_updates_

    @property
    def version(self) -> str:
        """Hyperparameters + number of updates: identifies the model that decided."""
        params = json.dumps(self.settings.model_dump(mode="json"), sort_keys=True)
        digest = hashlib.sha256(f"{params}|{self.dim}".encode()).hexdigest()[:8]
        return f"{self.settings.kind}-{digest}.{self.n_updates}"

    @abc.abstractmethod
    def _scores(self, X: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    def _distribution(self, scores: np.ndarray) -> np.ndarray: ...

    def scores(self, X: object) -> np.ndarray:
        return self._scores(check_matrix(X, self.dim))

    def distribution(self, X: object) -> np.ndarray:
        """Probability of choosing each candidate, array of shape (n_candidates,)."""
        return self._distribution(self.scores(X))

    def decide(self, X: object, event_id: str) -> Decision:
        scores = self.scores(X)
        probabilities = self._distribution(scores)
        chosen = int(event_rng(event_id, self.name).choice(len(probabilities), p=probabilities))
        return Decision(scores, probabilities, chosen)

    def update(self, x: object, reward: float) -> Policy:
        if not np.isfinite(reward):
            raise PolicyInputError(f"reward must be finite, got {reward}")
        self.stats_.update(check_vector(x, self.dim), float(reward))
        return self


class LinUCB(Policy):
    """Upper confidence bound on a shared ridge model, softened into probabilities.

    score_i = θᵀx_i + α √(x_iᵀ A⁻¹ x_i);  p = (1 − ε) softmax(score / τ) + ε / K.
    The softmax (instead of argmax) and the ε floor keep every propensity > 0, so the log
    supports unbiased off-policy evaluation.
    """

    def _scores(self, X: np.ndarray) -> np.ndarray:
        mean = X @ self.stats_.theta
        width = np.sqrt(np.einsum("ij,jk,ik->i", X, self.stats_.A_inv_, X).clip(min=0.0))
        return mean + self.settings.alpha * width

    def _distribution(self, scores: np.ndarray) -> np.ndarray:
        return with_floor(softmax(scores, self.settings.temperature), self.settings.epsilon)


class EpsilonGreedy(Policy):
    """Greedy on the ridge estimate θᵀx with probability 1 − ε, uniform otherwise.

    Ties at the maximum share the greedy mass, so the distribution is well defined.
    """

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return X @ self.stats_.theta

    def _distribution(self, scores: np.ndarray) -> np.ndarray:
        best = np.isclose(scores, scores.max(), rtol=0.0, atol=1e-12)
        return with_floor(best / best.sum(), self.settings.epsilon)


class Uniform(Policy):
    """Every candidate equally likely; the reference any learner must beat."""

    def _scores(self, X: np.ndarray) -> np.ndarray:
        return np.zeros(len(X))

    def _distribution(self, scores: np.ndarray) -> np.ndarray:
        return np.full(len(scores), 1.0 / len(scores))


POLICY_CLASSES: dict[str, type[Policy]] = {
    "linucb": LinUCB,
    "egreedy": EpsilonGreedy,
    "uniform": Uniform,
}


def make_policy(settings: PolicySettings, dim: int) -> Policy:
    return POLICY_CLASSES[settings.kind](settings, dim)
