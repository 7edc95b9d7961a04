"""Drift: how fast each policy recovers when users' habits turn around, with and without
forgetting.

Run with ``make bench-drift``.  LinUCB runs every half-life of ``HALF_LIVES_DAYS``; the
other learners (``--kinds``) none and ``OTHER_HALF_LIFE_DAYS``.  The simulator's users
are stationary until decision ``--drift-at``; from there their time-of-day habits turn
around (``tipgraph.simulator.DRIFTED_TIME_BONUS``).  For each policy, half-life and seed
it reports how many decisions after the drift the policy needs until its next 200
decisions earn 90% of what the (new) oracle would
(:func:`tipgraph.policy_comparison.regain_decisions`), and its share of the oracle over
the 1,000 decisions before the drift (what forgetting costs a stationary population),
the 1,000 after it, and the last 1,000.  Simulated time runs one day per 200 decisions.
Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ProcessPoolExecutor

from tipgraph.policy_comparison import regain_decisions, run_policy
from tipgraph.settings import parse_policy

DAY_S = 86_400.0
HALF_LIVES_DAYS: tuple[float | None, ...] = (None, 10.0, 3.0, 1.0)
OTHER_HALF_LIFE_DAYS = 3.0
LEARNERS = ("linucb", "lints", "egreedy", "softmax", "squarecb")
HYPERPARAMETERS: dict[str, dict[str, float]] = {"linucb": {"alpha": 0.5}}  # else defaults


Outcome = tuple[str, float | None, int, float, float, float, int | None]
WINDOW = 200


def _run(job: tuple[str, float | None, int, int, int]) -> Outcome:
    kind, days, seed, drift_at, decisions = job
    settings = parse_policy(
        {
            "name": kind,
            "kind": kind,
            **HYPERPARAMETERS.get(kind, {}),
            "half_life_s": None if days is None else days * DAY_S,
        }
    )
    result = run_policy(settings, seed=seed, decisions=decisions, drift_at=drift_at)

    def share(first: int, last: int) -> float:
        return float(result.served[first:last].mean() / result.oracle[first:last].mean())

    before = share(drift_at - 1000, drift_at)
    dip = share(drift_at, drift_at + 1000)
    end = share(decisions - 1000, decisions)
    return kind, days, seed, before, dip, end, regain_decisions(result, drift_at, window=WINDOW)


def half_lives(kind: str) -> tuple[float | None, ...]:
    return HALF_LIVES_DAYS if kind == "linucb" else (None, OTHER_HALF_LIFE_DAYS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--drift-at", type=int, default=5000)
    parser.add_argument("--decisions", type=int, default=12_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kinds", default=",".join(LEARNERS), help="comma-separated")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    jobs = [
        (kind, days, seed, args.drift_at, args.decisions)
        for kind in kinds
        for days in half_lives(kind)
        for seed in range(args.seeds)
    ]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(_run, jobs))
    after = args.decisions - args.drift_at
    print(
        f"LinUCB (alpha 0.5), the others at their defaults, drift at decision "
        f"{args.drift_at:,} of {args.decisions:,}, "
        f"{args.seeds} seeds; regain: decisions until the next {WINDOW} earn 90% of the new "
        f"oracle (never: not within the run)\n"
    )
    print(
        "| policy | half-life | regain, per seed | regain, median | share of oracle: "
        "1,000 before the drift | 1,000 after | last 1,000 |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for kind in kinds:
        for days in half_lives(kind):
            rows = [r for r in results if r[:2] == (kind, days)]
            regains = [r[6] for r in rows]
            censored = [after if g is None else g for g in regains]
            label = "none" if days is None else f"{days:g} d ({days * 200:,.0f} decisions)"
            shown = ", ".join("never" if g is None else str(g) for g in regains)
            shares = " | ".join(f"{statistics.mean(r[i] for r in rows):.1%}" for i in (3, 4, 5))
            median = statistics.median(censored)
            print(f"| {kind} | {label} | {shown} | {median:,.0f} | {shares} |")


if __name__ == "__main__":
    main()
