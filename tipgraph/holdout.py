"""The on-policy holdout: a stable share of users served by a simple policy.

Off-policy estimates say what a policy *would* have earned; a holdout measures what the
bandit *does* earn against a baseline, causally, on live users (as Statsig, Eppo or
Optimizely run experiments).  A user is in the holdout when a keyed hash of their
pseudonymous key falls below ``experiment.holdout_fraction``: the same answer on every
replica and after every restart, and a new ``holdout_salt`` draws a new holdout.  Their
decisions are made here, in the ingress, by ``holdout_policy`` (uniform or the rule
baseline, neither of which learns, so no replica state is needed) and logged under its
name (``holdout_uniform`` / ``holdout_baseline``) with its probabilities; their feedback
teaches the bandit like any other logged decision.  ``tipgraph report`` compares the two
groups' realised rewards per day.  A rotated user-key secret changes every pseudonym, so
it draws a new holdout too.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from tipgraph.policies import make_policy
from tipgraph.scoring import PolicyScore, PolicyService
from tipgraph.settings import BaselineSettings, ExperimentSettings, UniformSettings

Z_95 = NormalDist().inv_cdf(0.975)


HOLDOUT_PREFIX = "holdout_"
"""Holdout decisions are logged under holdout_uniform / holdout_baseline."""


@dataclass(frozen=True)
class RewardStats:
    """Count, sum and sum of squares of rewards: statistics that merge with ``+``."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def __add__(self, other: RewardStats) -> RewardStats:
        return RewardStats(self.n + other.n, self.total + other.total, self.squares + other.squares)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else math.nan

    @property
    def variance(self) -> float:
        """The sample variance (n − 1)."""
        if self.n < 2:
            return math.nan
        return max(self.squares - self.total**2 / self.n, 0.0) / (self.n - 1)


def welch_lift(bandit: RewardStats, holdout: RewardStats) -> tuple[float, float, float]:
    """(mean difference, 95% lower, 95% upper): Welch's normal interval,
    (m_b − m_h) ± z·√(s²_b/n_b + s²_h/n_h)."""
    diff = bandit.mean - holdout.mean
    se = math.sqrt(bandit.variance / bandit.n + holdout.variance / holdout.n)
    return diff, diff - Z_95 * se, diff + Z_95 * se


def holdout_share(user_key: str, salt: str) -> float:
    """Where the user falls in [0, 1): the assignment's keyed hash."""
    digest = hashlib.sha256(f"{salt}\x1f{user_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


class Holdout:
    """Decides for the users in the holdout; :meth:`contains` says who they are."""

    def __init__(self, settings: ExperimentSettings, dim: int) -> None:
        self._fraction = settings.holdout_fraction
        self._salt = settings.holdout_salt
        name = settings.holdout_name
        policy = (
            UniformSettings(name=name)
            if settings.holdout_policy == "uniform"
            else BaselineSettings(name=name)
        )
        self._service = PolicyService(make_policy(policy, dim))

    @property
    def name(self) -> str:
        return self._service.policy.name

    def contains(self, user_key: str) -> bool:
        return self._fraction > 0 and holdout_share(user_key, self._salt) < self._fraction

    def score(self, X: np.ndarray, event_id: str) -> PolicyScore:
        return self._service.score(X, event_id)
