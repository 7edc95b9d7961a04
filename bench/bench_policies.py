"""Policy benchmarks: throughput against MABWiser, scoring latency, state memory.

Run with ``make bench-policies`` (installs MABWiser into .venv first). Prints a markdown
report for BENCHMARKS.md.  Timings are wall-clock on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
import tracemalloc
from datetime import UTC, datetime

import numpy as np

from tipgraph.policies import make_policy
from tipgraph.settings import LinUCBSettings

LINUCB = LinUCBSettings(name="bench", alpha=1.0, epsilon=0.05)


def tipgraph_loop(n_events: int, n_arms: int, dim: int, seed: int = 0) -> float:
    """Events/s: score n_arms candidate vectors, draw, learn the reward of the draw."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_events, n_arms, dim))
    rewards = rng.uniform(size=n_events)
    policy = make_policy(LINUCB, dim)
    start = time.perf_counter()
    for i in range(n_events):
        decision = policy.decide(X[i], str(i))
        policy.update(X[i, decision.chosen], rewards[i])
    return n_events / (time.perf_counter() - start)


def mabwiser_loop(n_events: int, n_arms: int, dim: int, seed: int = 0) -> float:
    """Events/s of MABWiser's LinUCB on the same loop: predict, then partial_fit one event."""
    from mabwiser.mab import MAB, LearningPolicy

    rng = np.random.default_rng(seed)
    contexts = rng.normal(size=(n_events, dim))
    rewards = rng.uniform(size=n_events)
    arms = list(range(n_arms))
    mab = MAB(arms=arms, learning_policy=LearningPolicy.LinUCB(alpha=1.0), seed=seed)
    warm = rng.normal(size=(n_arms, dim))
    mab.fit(decisions=arms, rewards=list(rng.uniform(size=n_arms)), contexts=warm)
    start = time.perf_counter()
    for i in range(n_events):
        context = contexts[i : i + 1]
        arm = mab.predict(context)
        mab.partial_fit(decisions=[arm], rewards=[rewards[i]], contexts=context)
    return n_events / (time.perf_counter() - start)


def scoring_latency_us(n_candidates: int, dim: int, calls: int = 20_000) -> dict[str, float]:
    """Median µs per call of decide() (scores + probabilities + seeded draw) and of the
    score step alone, on a policy that has learned 1,000 rewards."""
    rng = np.random.default_rng(1)
    policy = make_policy(LINUCB, dim)
    for _ in range(1000):
        policy.update(rng.normal(size=dim), float(rng.uniform()))
    X = rng.normal(size=(n_candidates, dim))
    results = {}
    for name, call in (
        ("decide", lambda i: policy.decide(X, str(i))),
        ("scores", lambda i: policy.scores(X)),
    ):
        for i in range(500):
            call(i)  # warm up caches
        samples = []
        for i in range(calls):
            start = time.perf_counter_ns()
            call(i)
            samples.append(time.perf_counter_ns() - start)
        results[name] = statistics.median(samples) / 1000
    return results


def state_memory(dim: int) -> dict[str, float]:
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    policy = make_policy(LINUCB, dim)
    policy.update(np.ones(dim), 1.0)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    allocated = sum(s.size_diff for s in after.compare_to(before, "filename"))
    arrays = policy.stats_.gram_.nbytes + policy.stats_.b_.nbytes + policy.stats_.A_inv_.nbytes
    return {
        "arrays_kib": arrays / 1024,
        "traced_kib": allocated / 1024,
        "serialised_kib": len(policy.to_bytes()) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--mabwiser-events", type=int, default=2_000)
    args = parser.parse_args()

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"## Policy benchmarks — {datetime.now(UTC):%Y-%m-%d}, commit {commit}, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"numpy {np.__version__}"
    )
    print()
    ours = tipgraph_loop(args.events, n_arms=20, dim=32)
    theirs = mabwiser_loop(args.mabwiser_events, n_arms=20, dim=32)
    print("| loop: 20 arms, d = 32, predict + update per event | events/s |")
    print("| --- | --- |")
    print(f"| tipgraph LinUCB ({args.events:,} events) | {ours:,.0f} |")
    print(f"| MABWiser 2.7.4 LinUCB ({args.mabwiser_events:,} events) | {theirs:,.0f} |")
    print(f"| ratio | **{ours / theirs:,.1f}×** (goal ≥ 50×) |")
    print()
    latency = scoring_latency_us(50, 64)
    print("| scoring 50 candidates, d = 64 | median µs per call |")
    print("| --- | --- |")
    print(f"| `decide` (scores, probabilities, seeded draw) | {latency['decide']:.1f} |")
    print(f"| `scores` alone | {latency['scores']:.1f} |")
    print()
    print("| policy state | A⁻¹ + Σxxᵀ + b in memory | traced allocation | serialised |")
    print("| --- | --- | --- | --- |")
    for dim in (64, 256):
        mem = state_memory(dim)
        print(
            f"| d = {dim} | {mem['arrays_kib']:.0f} KiB | {mem['traced_kib']:.0f} KiB "
            f"| {mem['serialised_kib']:.0f} KiB |"
        )


if __name__ == "__main__":
    main()
