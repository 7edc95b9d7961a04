"""Bandit logs from the synthetic users, with the hidden truth that off-policy estimates
are checked against.

The decisions come from :func:`tipgraph.policy_comparison.simulate_decisions`, the loop
behind the policy table (so the same seed and policy make the same decisions); this
module records what a decision log holds: every candidate's features and logging
probability, the chosen index and the sampled reward.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from tipgraph.policy_comparison import simulate_decisions
from tipgraph.settings import PolicySettings
from tipgraph.simulator import (
    START,
)
from tuning.logged import LoggedBandit, check_distribution

HISTORY_LIMIT = 200
DECISION_SPACING = timedelta(days=1) / 200
"""The log clock: the simulator starts a new day every 200 decisions (``make_request``)."""


def simulate_log(
    logging: PolicySettings,
    *,
    n_events: int,
    seed: int,
    users: int = 50,
    n_candidates: int = 8,
    learn: bool = True,
) -> tuple[LoggedBandit, np.ndarray]:
    """Run the logging policy on the simulator; return the log and E[r | x, a] per candidate.

    The second array has shape (n_candidates_total,), laid out like ``log.pscore``.  With
    ``learn`` the logging policy learns from every reward, as in production (an adaptive
    log); without it, it keeps its initial, untrained state.  Decision i is stamped
    ``START + i · DECISION_SPACING``, so the log is time-ordered.
    """
    for name, count in (("n_events", n_events), ("users", users), ("n_candidates", n_candidates)):
        if count < 1:
            raise ValueError(f"{name} must be >= 1, got {count}")
    features: list[np.ndarray] = []
    pscore: list[np.ndarray] = []
    expected: list[np.ndarray] = []
    sizes = np.empty(n_events, dtype=np.int64)
    chosen = np.empty(n_events, dtype=np.int64)
    reward = np.empty(n_events)
    steps = simulate_decisions(
        logging,
        seed=seed,
        users=users,
        decisions=n_events,
        history_limit=HISTORY_LIMIT,
        n_candidates=n_candidates,
        learn=learn,
    )
    for i, step in enumerate(steps):
        features.append(step.X)
        pscore.append(step.decision.probabilities)
        expected.append(step.values)
        sizes[i], chosen[i], reward[i] = len(step.X), step.decision.chosen, step.reward
    event_ids = [f"{seed}-{i}" for i in range(n_events)]  # as simulate_decisions names them
    start = np.datetime64(START.replace(tzinfo=None), "us")
    log = LoggedBandit(
        X=np.concatenate(features),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        pscore=np.concatenate(pscore),
        chosen=chosen,
        reward=reward,
        event_id=np.array(event_ids),
        timestamp=start + np.arange(n_events) * np.timedelta64(DECISION_SPACING),
    )
    return log, np.concatenate(expected)


def true_value(action_dist: np.ndarray, expected: np.ndarray, log: LoggedBandit) -> float:
    """V(π) = (1/n) Σ_i Σ_a π(a|x_i) E[r | x_i, a] on the log's contexts.

    ``action_dist`` and ``expected`` have shape (n_candidates_total,), laid out like
    ``log.pscore``.
    """
    pi = check_distribution(action_dist, log.offsets, "action_dist")
    truth = np.asarray(expected, dtype=np.float64)
    if truth.shape != pi.shape:
        raise ValueError(f"expected must have shape {pi.shape}, got {truth.shape}")
    return float(log.per_event_sum(pi * truth).mean())
