"""Does learning on the embedding features help? (issue 17)

The simulator in process (no Ray, no HTTP), mixed mode from the candidate pool, the three
model aliases answered by ``tipgraph.simulated_tips``: LLM tips carry a hidden quality
that users act on, which the judge barely sees and the embedding reveals.  The served
policy (LinUCB, as shipped) learns once on every feature group and once without the
``embedding`` group, over the same seeds; the table gives the reward share of the oracle
over the last quarter of the decisions, per seed, and the judge's rejection rate.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from bench.bench_graph import run_header
from tipgraph.metrics import POOL_TIPS_REJECTED, Metrics, MetricSpec
from tipgraph.settings import FeatureGroup, TipgraphSettings, load_settings
from tipgraph.simulated_tips import SimulatedModels
from tipgraph.simulator import Block, run_local

ROOT = Path(__file__).resolve().parents[1]
WITHOUT_EMBEDDING = tuple(g for g in get_args(FeatureGroup) if g != "embedding")


@dataclass
class Rejections:
    """A metric sink that keeps the pool's rejected tips by reason, and nothing else."""

    by_reason: Counter[str] = field(default_factory=Counter)

    def inc(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        if metric is POOL_TIPS_REJECTED:
            self.by_reason[tags["reason"]] += int(value)

    def set(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        pass

    def observe(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        pass


def run(
    features: tuple[str, ...] | None, seed: int, args: argparse.Namespace, tmp: Path
) -> tuple[float, SimulatedModels, Rejections]:
    base = load_settings(ROOT / "configs" / "tipgraph.yaml")
    policy = {**base.policy.model_dump(), "features": features}
    settings = TipgraphSettings(
        **{
            **base.model_dump(exclude={"store", "generation", "policy", "shadows"}),
            "store": {
                "url": f"sqlite:///{tmp}/{seed}-{features is None}.db",
                "spill_dir": str(tmp / "spill"),
            },
            "generation": {
                **base.generation.model_dump(),
                "source": "mixed",
                "serve_from": "pool",
                "prompts_dir": str(ROOT / "configs" / "prompts"),
                "llm_config": str(ROOT / "configs" / "llm.yaml"),
            },
            "policy": policy,
            "shadows": [],
        }
    )
    llm, sink = SimulatedModels(), Rejections()
    blocks: list[Block] = run_local(
        settings,
        users=args.users,
        decisions=args.decisions,
        seed=seed,
        block=args.decisions // 4,
        task_churn=args.churn,
        llm=llm,
        metrics=Metrics(sink),
    )
    last = blocks[-1]
    return last.served / last.oracle, llm, sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--churn", type=float, default=0.05)
    args = parser.parse_args()
    details = f"{args.decisions} decisions, {args.users} users, churn {args.churn}"
    print(run_header(details), flush=True)
    shares: dict[str, list[float]] = {"every group": [], "without embedding": []}
    written = generated = 0
    rejected: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp_dir:
        for seed in range(args.seeds):
            for name, features in (("every group", None), ("without embedding", WITHOUT_EMBEDDING)):
                share, llm, sink = run(features, seed, args, Path(tmp_dir))
                shares[name].append(share)
                written += llm.tips_written
                generated += llm.generations
                rejected += sink.by_reason
                print(f"seed {seed}, {name}: {share:.3f} of the oracle", flush=True)
    print("\n| features | reward share of oracle, last quarter, per seed | mean | spread |")
    print("| --- | --- | ---: | ---: |")
    for name, values in shares.items():
        cells = ", ".join(f"{v:.3f}" for v in values)
        spread = max(values) - min(values)
        print(f"| {name} | {cells} | {statistics.mean(values):.3f} | {spread:.3f} |")
    judged = sum(rejected[r] for r in ("unsafe", "low_score", "no_verdict"))
    print(
        f"\njudge: {judged} of {written} generated tips rejected ({100 * judged / written:.1f}%: "
        f"{dict(rejected)}); {generated} generations"
    )


if __name__ == "__main__":
    main()
