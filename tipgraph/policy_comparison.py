"""Every policy on the simulator, in process, over several seeds: the policy table.

This loop skips HTTP, Ray and the decision log.  It uses the same context features,
task-mode candidates and policies as serving, and keeps each user's reaction history in
memory.  A policy's value is the hidden *expected* reward of the tip it served, which has
less variance than the sampled reaction; the policies still learn from the sampled
reactions, as they do in production.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta

import numpy as np

from tipgraph.candidates import task_candidates
from tipgraph.contracts import TipRequest
from tipgraph.features import FEATURE_SPEC, build_context, candidate_matrix
from tipgraph.policies import Decision, make_policy
from tipgraph.settings import PolicySettings, RewardSettings
from tipgraph.simulator import (
    Truth,
    expected_reward,
    make_request,
    make_users,
    react,
    request_streams,
)
from tipgraph.store.records import ReactionHistoryItem

ORACLE, UNIFORM = "oracle", "uniform (expected)"


@dataclass(frozen=True)
class RunResult:
    policy: str
    seed: int
    served: np.ndarray  # expected reward of the served tip, per decision
    oracle: np.ndarray  # best expected reward on offer, per decision
    uniform: np.ndarray  # mean expected reward on offer, per decision


@dataclass(frozen=True)
class SimulatedDecision:
    """One in-process decision: what was offered, decided and earned."""

    X: np.ndarray  # joint features of the candidates, shape (K, d)
    decision: Decision
    values: np.ndarray  # hidden expected reward of every candidate, shape (K,)
    reward: float  # the sampled reward of the served tip


def simulate_decisions(
    policy_settings: PolicySettings,
    *,
    seed: int,
    users: int = 50,
    decisions: int = 20_000,
    history_limit: int = 200,
    rewards: RewardSettings | None = None,
    n_candidates: int = 8,
    learn: bool = True,
    drift_at: int | None = None,
) -> Iterator[SimulatedDecision]:
    """The policy deciding on the simulator's request stream, event ids ``{seed}-{i}``.

    With ``learn`` the policy learns every sampled reward, at the request's simulated
    time, as in production.  From decision ``drift_at`` on, the users' hidden time-of-day
    habits turn around (:data:`~tipgraph.simulator.DRIFTED_TIME_BONUS`).
    """
    rewards = rewards or RewardSettings()
    policy = make_policy(policy_settings, FEATURE_SPEC.dim, spec_version=FEATURE_SPEC.version)
    rng, reaction_rng = request_streams(seed)
    population = make_users(users, rng)
    history: dict[str, list[ReactionHistoryItem]] = {u.user_id: [] for u in population}
    for i in range(decisions):
        sim = make_request(population[int(rng.integers(users))], i, rng)
        if drift_at is not None and i >= drift_at:
            sim = replace(sim, drifted=True)
        request = TipRequest.model_validate(sim.body)
        past = history[sim.user.user_id]
        context = build_context(request, past[:history_limit], rewards)
        candidates = task_candidates(request, context, n_candidates)
        X = candidate_matrix(context, [c.view for c in candidates])
        values = np.array(
            [expected_reward(sim, Truth(c.kind, c.task_id), rewards) for c in candidates]
        )
        decision = policy.decide(X, f"{seed}-{i}")
        chosen = candidates[decision.chosen]
        reaction = react(sim, Truth(chosen.kind, chosen.task_id), reaction_rng)
        reward = rewards.reward_for(reaction)  # type: ignore[arg-type]
        if learn:
            policy.update(X[decision.chosen], reward, request.local_now().timestamp())
        shown_at = request.local_now() + timedelta(seconds=1)
        past.insert(0, ReactionHistoryItem(chosen.kind, reaction, reward, shown_at))
        yield SimulatedDecision(X, decision, values, reward)


def run_policy(
    policy_settings: PolicySettings,
    *,
    seed: int,
    users: int = 50,
    decisions: int = 20_000,
    history_limit: int = 200,
    rewards: RewardSettings | None = None,
    n_candidates: int = 8,
    drift_at: int | None = None,
) -> RunResult:
    served, oracle, uniform = np.empty(decisions), np.empty(decisions), np.empty(decisions)
    for i, step in enumerate(
        simulate_decisions(
            policy_settings,
            seed=seed,
            users=users,
            decisions=decisions,
            history_limit=history_limit,
            rewards=rewards,
            n_candidates=n_candidates,
            drift_at=drift_at,
        )
    ):
        values = step.values
        served[i], oracle[i], uniform[i] = (
            values[step.decision.chosen],
            values.max(),
            values.mean(),
        )
    return RunResult(policy_settings.name, seed, served, oracle, uniform)


def regain_decisions(
    result: RunResult, drift_at: int, *, window: int = 500, share: float = 0.9
) -> int | None:
    """Decisions after ``drift_at`` until the policy is back at ``share`` of the oracle:
    the first k whose next ``window`` decisions earn at least ``share`` of what the oracle
    would have.  None if it never gets there within the run."""
    served = np.cumsum(np.concatenate([[0.0], result.served[drift_at:]]))
    oracle = np.cumsum(np.concatenate([[0.0], result.oracle[drift_at:]]))
    for k in range(len(served) - window):
        if served[k + window] - served[k] >= share * (oracle[k + window] - oracle[k]):
            return k
    return None


@dataclass(frozen=True)
class Row:
    name: str
    mean: float
    sd: float
    share_of_oracle: float


def _run(args: tuple[PolicySettings, int, int, int]) -> RunResult:
    settings, seed, users, decisions = args
    return run_policy(settings, seed=seed, users=users, decisions=decisions)


def compare(
    policies: Sequence[PolicySettings],
    seeds: Sequence[int],
    *,
    users: int = 50,
    decisions: int = 20_000,
    last: int = 5_000,
    workers: int = 1,
) -> list[Row]:
    """Mean ± sd over seeds of each policy's mean value over the last ``last`` decisions."""
    jobs = [(p, seed, users, decisions) for p in policies for seed in seeds]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_run, jobs))
    else:
        results = [_run(job) for job in jobs]
    per_policy: dict[str, list[float]] = {}
    oracle: dict[int, float] = {}
    uniform: dict[int, float] = {}
    for result in results:
        per_policy.setdefault(result.policy, []).append(float(result.served[-last:].mean()))
        # Same seed, same request stream: the oracle and uniform values agree across runs.
        oracle[result.seed] = float(result.oracle[-last:].mean())
        uniform[result.seed] = float(result.uniform[-last:].mean())
    oracle_mean = float(np.mean(list(oracle.values())))
    rows = [
        Row(ORACLE, oracle_mean, float(np.std(list(oracle.values()))), 1.0),
        Row(
            UNIFORM,
            float(np.mean(list(uniform.values()))),
            float(np.std(list(uniform.values()))),
            float(np.mean(list(uniform.values()))) / oracle_mean,
        ),
    ]
    for name, values in per_policy.items():
        rows.append(
            Row(
                name,
                float(np.mean(values)),
                float(np.std(values)),
                float(np.mean(values)) / oracle_mean,
            )
        )
    return rows


def format_table(rows: Sequence[Row], *, seeds: int, decisions: int, last: int) -> str:
    lines = [
        f"Mean expected reward over the last {last:,} of {decisions:,} decisions, "
        f"mean ± sd over {seeds} seeds",
        "",
        "| policy | mean reward | share of oracle |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r.name} | {r.mean:.3f} ± {r.sd:.3f} | {r.share_of_oracle:.1%} |" for r in rows]
    return "\n".join(lines)
