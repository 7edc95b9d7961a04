"""How much an off-policy estimate can be trusted: what the logged propensities support.

Every :class:`~tuning.ope.Estimate` carries a :class:`Diagnostics` block computed from the
log and the target alone (the same for every estimator on that pair):

* effective sample size ESS = (Σ_i w_i)² / Σ_i w_i², with w_i = π(a_i|x_i) / μ(a_i|x_i)
  over the logged actions: about how many events the weighted part of an estimate really
  rests on (Kong 1992, "A note on importance sampling using standardized weights";
  Owen 2013, "Monte Carlo theory, methods and examples", §9.3).  n for a target equal to
  the logger, far less when π puts its mass where μ rarely went.
* the largest weight max_i w_i: one event with w = 200 moves IPS by 200 r_i / n.
* rare mass: the share of the target's probability on candidates the logger chose with
  probability below ``rare_below``, (1/n) Σ_i Σ_a π(a|x_i) 1{μ(a|x_i) < rare_below}; the
  part of V(π) that rests on few logged examples (0 < μ) or on none (μ = 0), where a
  reward model's guess or a bias bound stands in for data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tuning.logged import LoggedBandit

RARE_BELOW = 0.05
"""Default propensity under which the logger 'rarely' chose a candidate."""


@dataclass(frozen=True)
class Diagnostics:
    effective_sample_size: float
    max_weight: float
    rare_mass: float
    rare_below: float = RARE_BELOW
    n_events: int = 0

    @property
    def ess_share(self) -> float:
        """ESS / n: 1 when every weight is equal, near 0 when a few events carry it all."""
        return self.effective_sample_size / self.n_events if self.n_events else 0.0

    def describe(self) -> str:
        return (
            f"ESS {self.effective_sample_size:.0f} of {self.n_events} "
            f"({self.ess_share:.0%}), max weight {self.max_weight:.3g}, "
            f"{self.rare_mass:.1%} of the target's mass on candidates logged with "
            f"p < {self.rare_below:g}"
        )


def diagnose(log: LoggedBandit, pi: np.ndarray, rare_below: float = RARE_BELOW) -> Diagnostics:
    """The block for ``pi`` of shape (N,) (a distribution per event) on ``log``."""
    rows = log.chosen_rows
    w = pi[rows] / log.pscore[rows]
    total, squares = float(w.sum()), float(np.square(w).sum())
    ess = total**2 / squares if squares > 0 else 0.0
    rare = float(log.per_event_sum(np.where(log.pscore < rare_below, pi, 0.0)).mean())
    return Diagnostics(
        effective_sample_size=ess,
        max_weight=float(w.max()) if len(w) else 0.0,
        rare_mass=rare,
        rare_below=rare_below,
        n_events=log.n_events,
    )
