"""Bandit logs from the synthetic users, with the hidden truth that off-policy estimates
are checked against.

The loop is the one of :func:`tipgraph.policy_comparison.run_policy` (same request
streams, context features, task-mode candidates and event ids, so the same seed and
policy make the same decisions), but it records what a decision log holds: every
candidate's features and logging probability, the chosen index and the sampled reward.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np

from tipgraph.candidates import task_candidates
from tipgraph.contracts import TipRequest
from tipgraph.features import FEATURE_SPEC, build_context, candidate_matrix
from tipgraph.policies import make_policy
from tipgraph.settings import PolicySettings, RewardSettings
from tipgraph.simulator import (
    START,
    expected_reward,
    make_request,
    make_users,
    react,
    request_streams,
)
from tipgraph.store.records import ReactionHistoryItem
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
    rewards = RewardSettings()
    policy = make_policy(logging, FEATURE_SPEC.dim, spec_version=FEATURE_SPEC.version)
    rng, reaction_rng = request_streams(seed)
    population = make_users(users, rng)
    history: dict[str, list[ReactionHistoryItem]] = {u.user_id: [] for u in population}
    features: list[np.ndarray] = []
    pscore: list[np.ndarray] = []
    expected: list[np.ndarray] = []
    sizes = np.empty(n_events, dtype=np.int64)
    chosen = np.empty(n_events, dtype=np.int64)
    reward = np.empty(n_events)
    event_ids = [f"{seed}-{i}" for i in range(n_events)]
    for i, event_id in enumerate(event_ids):
        sim = make_request(population[int(rng.integers(users))], i, rng)
        request = TipRequest.model_validate(sim.body)
        past = history[sim.user.user_id]
        context = build_context(request, past[:HISTORY_LIMIT], rewards)
        candidates = task_candidates(request, context, n_candidates)
        X = candidate_matrix(context, [c.view for c in candidates])
        decision = policy.decide(X, event_id)
        picked = candidates[decision.chosen]
        reaction = react(sim, picked.kind, picked.task_id, reaction_rng)
        value = rewards.reward_for(reaction)  # type: ignore[arg-type]
        if learn:
            policy.update(X[decision.chosen], value)
        shown_at = request.local_now() + timedelta(seconds=1)
        past.insert(0, ReactionHistoryItem(picked.kind, reaction, value, shown_at))
        features.append(X)
        pscore.append(decision.probabilities)
        expected.append(
            np.array([expected_reward(sim, c.kind, c.task_id, rewards) for c in candidates])
        )
        sizes[i], chosen[i], reward[i] = len(candidates), decision.chosen, value
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
