"""Tuning benchmarks: progressive replay throughput per trial, and a whole sweep's wall time.

Run with ``make bench-tuning``.  Prints a markdown report for BENCHMARKS.md.

* Replay: one trial's work, :func:`tuning.ope.progressive` (DR) on a synthetic log with
  d = 32 features and K = 10 candidates per event, per policy kind; also the policy's own
  loop (:meth:`Policy.replay`) alone, which is what bounds it.
* Sweep: ``run_sweep`` with the shipped search space (configs/tuning.yaml) on a simulator
  log of 100,000 decisions with tipgraph's real features, 32 trials, every trial logged to
  a throw-away MLflow database and the winner registered.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from tipgraph.policies import make_policy
from tipgraph.settings import EpsilonGreedySettings, TipgraphSettings, parse_policy
from tuning.config import load_tuning_settings
from tuning.data import TrainingLog
from tuning.logged import LoggedBandit
from tuning.ope import progressive
from tuning.simulated_log import simulate_log
from tuning.sweep import run_sweep

KINDS = ("linucb", "egreedy", "softmax", "squarecb", "lints")


def synthetic_log(n_events: int, n_candidates: int, dim: int, seed: int = 0) -> LoggedBandit:
    rng = np.random.default_rng(seed)
    n_rows = n_events * n_candidates
    return LoggedBandit(
        X=rng.normal(size=(n_rows, dim)) / np.sqrt(dim),
        offsets=np.arange(0, n_rows + 1, n_candidates),
        pscore=np.full(n_rows, 1.0 / n_candidates),
        chosen=rng.integers(0, n_candidates, n_events),
        reward=rng.uniform(size=n_events),
        event_id=np.array([f"e{i}" for i in range(n_events)]),
        timestamp=np.arange(n_events, dtype=np.float64),
    )


def replay_throughput(
    n_events: int, n_candidates: int, dim: int, rounds: int = 3
) -> list[tuple[str, float, float, float]]:
    """(kind, progressive DR, Policy.replay alone, Policy.replay(reference=True) alone), each in
    events/s, the median of ``rounds`` rounds that interleave the kinds and the loops."""
    log = synthetic_log(n_events, n_candidates, dim)
    args = (log.X, log.offsets, log.chosen_rows, log.reward, log.event_id.tolist())
    settings = {
        kind: parse_policy(
            dict(name=kind, kind=kind, **({"ts_draws": 64} if kind == "lints" else {}))
        )
        for kind in KINDS
    }
    # Compile (or load numba's cache) before any clock starts.
    warm = np.array([0, n_candidates])
    make_policy(settings["linucb"], dim).replay(log.X[:n_candidates], warm, [0], [1.0], ["w"])
    timings: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind in KINDS:
            start = time.perf_counter()
            progressive(make_policy(settings[kind], dim), log, estimator="dr")
            full = n_events / (time.perf_counter() - start)
            start = time.perf_counter()
            make_policy(settings[kind], dim).replay(*args)
            loop = n_events / (time.perf_counter() - start)
            start = time.perf_counter()
            make_policy(settings[kind], dim).replay(*args, reference=True)
            reference = n_events / (time.perf_counter() - start)
            timings[kind].append((full, loop, reference))
    return [
        (kind, *(float(np.median(column)) for column in zip(*timings[kind], strict=True)))
        for kind in KINDS
    ]


def numpy_call_overhead_us() -> float:
    """Median µs of one tiny numpy call (a 10 x 32 @ 32 product): the floor per operation."""
    a, b = np.ones((10, 32)), np.ones(32)
    times = []
    for _ in range(20):
        start = time.perf_counter()
        for _ in range(10_000):
            a @ b
        times.append((time.perf_counter() - start) / 10_000 * 1e6)
    return float(np.median(times))


def sweep_wall_time(n_events: int, num_samples: int, config: Path) -> tuple[float, float, str]:
    """(seconds to simulate the log, seconds for the sweep, the winner line)."""
    tuning = load_tuning_settings(config)
    start = time.perf_counter()
    logging_policy = EpsilonGreedySettings(name="egreedy", epsilon=0.2)
    log, _ = simulate_log(logging_policy, n_events=n_events, seed=0)
    simulate_s = time.perf_counter() - start
    from tipgraph.features import FEATURE_SPEC

    training = TrainingLog(log, FEATURE_SPEC.version, 0, f"simulator ({n_events} events)")
    with tempfile.TemporaryDirectory() as tmp:
        settings = TipgraphSettings(registry={"tracking_uri": f"sqlite:///{tmp}/mlflow.db"})
        tuning = tuning.model_copy(
            update={"num_samples": num_samples, "storage_path": f"{tmp}/tune"}
        )
        lines: list[str] = []
        start = time.perf_counter()
        result = run_sweep(tuning, settings, training=training, out=lines.append)
        sweep_s = time.perf_counter() - start
    summary = [line for line in lines if line.startswith(("winner:", "done in"))]
    return simulate_s, sweep_s, "\n\n".join(summary) + f"\n\n({len(result.trials)} trials)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replay-events", type=int, default=20_000)
    parser.add_argument("--sweep-events", type=int, default=100_000)
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--config", default="configs/tuning.yaml")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()

    print(f"## Tuning ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)\n")
    print(
        f"Progressive replay, d = 32, K = 10, {args.replay_events:,} events (events/s, "
        "medians of 3 interleaved rounds):\n"
    )
    print("| policy | progressive DR (one trial) | `Policy.replay` | `replay(reference=True)` |")
    print("|---|---:|---:|---:|")
    for kind, full, loop, reference in replay_throughput(args.replay_events, 10, 32):
        print(f"| {kind} | {full:,.0f} | {loop:,.0f} | {reference:,.0f} |")
    print(f"\nOne tiny numpy call costs {numpy_call_overhead_us():.2f} µs here.\n")
    if not args.skip_sweep:
        simulate_s, sweep_s, winner = sweep_wall_time(
            args.sweep_events, args.trials, Path(args.config)
        )
        print(
            f"Sweep: {args.trials} trials over {args.sweep_events:,} simulator events "
            f"(generating the log: {simulate_s:.1f} s, not counted): **{sweep_s:.1f} s** "
            f"wall.\n\n{winner}"
        )


if __name__ == "__main__":
    main()
