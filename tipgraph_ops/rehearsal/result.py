"""What a rehearsal scenario measured, and how ``result.json`` and the summary read.

Plain data and arithmetic: tested without a cluster (tests/test_rehearsal.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tipgraph_ops.rehearsal.load import Outcome


@dataclass(frozen=True)
class Sample:
    """Running replicas per deployment at one moment (``t``: rehearsal seconds)."""

    t: float
    replicas: dict[str, int]
    nodes: dict[str, list[str]] = field(default_factory=dict)
    """Deployment -> the node of each running replica."""


@dataclass(frozen=True)
class LoadFigures:
    requests: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    throughput_rps: float

    @classmethod
    def of(cls, outcomes: Sequence[Outcome], start: float, end: float) -> LoadFigures:
        """Requests started in [start, end); latency percentiles of the answered ones."""
        window = [o for o in outcomes if start <= o.started < end]
        answered = sorted(o.latency_s * 1000 for o in window if o.ok)
        seconds = max(end - start, 1e-9)
        return cls(
            requests=len(window),
            failed=sum(not o.ok for o in window),
            p50_ms=_percentile(answered, 50),
            p99_ms=_percentile(answered, 99),
            throughput_rps=round(len(answered) / seconds, 2),
        )


def _percentile(sorted_ms: Sequence[float], p: int) -> float | None:
    if not sorted_ms:
        return None
    if len(sorted_ms) == 1:
        return round(sorted_ms[0], 1)
    return round(statistics.quantiles(sorted_ms, n=100, method="inclusive")[p - 1], 1)


def stage_p50_ms(outcomes: Sequence[Outcome], start: float, end: float) -> dict[str, float]:
    """Median of each stage's server-side latency over the answers started in [start, end)."""
    by_stage: dict[str, list[float]] = {}
    for outcome in outcomes:
        if outcome.ok and outcome.stage_ms and start <= outcome.started < end:
            for stage, ms in outcome.stage_ms.items():
                by_stage.setdefault(stage, []).append(ms)
    return {stage: round(statistics.median(ms), 1) for stage, ms in by_stage.items()}


def per_second(outcomes: Sequence[Outcome], start: float, end: float) -> list[dict[str, Any]]:
    """``[{t, rps, p99_ms, failed}]`` per whole second, for the picture."""
    rows = []
    for second in range(math.floor(start), math.ceil(end)):
        figures = LoadFigures.of(outcomes, second, second + 1)
        rows.append(
            {
                "t": second,
                "rps": figures.throughput_rps,
                "p99_ms": figures.p99_ms,
                "failed": figures.failed,
            }
        )
    return rows


def timeline_rows(samples: Sequence[Sample], start: float, end: float) -> list[dict[str, Any]]:
    """``[{t, deployment, replicas}]`` within [start, end]: each deployment's count at the
    first sample and whenever it changes."""
    rows: list[dict[str, Any]] = []
    last: dict[str, int] = {}
    for sample in samples:
        if not start <= sample.t <= end:
            continue
        for deployment, count in sorted(sample.replicas.items()):
            if last.get(deployment) != count:
                rows.append({"t": round(sample.t, 1), "deployment": deployment, "replicas": count})
                last[deployment] = count
    return rows


@dataclass
class ScenarioResult:
    name: str
    started_s: float
    ended_s: float
    checks: dict[str, bool]
    """Each bound the scenario holds to, by a sentence that says it -> whether it held."""
    figures: LoadFigures
    decisions_answered: int
    decisions_stored: int
    timeline: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)
    """``[{t, event}]``: what the scenario did and saw (load on, node killed, ...)."""
    recovery_s: float | None = None
    measured: dict[str, Any] = field(default_factory=dict)
    """Scenario-specific figures (scale-out time, steady throughput, ...)."""
    goals: dict[str, bool] = field(default_factory=dict)
    """Speed figures against a bound: reported, not part of ``passed``."""
    outcomes: list[Outcome] = field(default_factory=list, repr=False)
    """Every request of the scenario (not written out: ``series`` sums them per second)."""

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def to_json(self) -> dict[str, Any]:
        figures = asdict(self.figures)
        return {
            "name": self.name,
            "passed": self.passed,
            "checks": self.checks,
            "goals": self.goals,
            "requests": figures["requests"],
            "failed": figures["failed"],
            "p50_ms": figures["p50_ms"],
            "p99_ms": figures["p99_ms"],
            "throughput_rps": figures["throughput_rps"],
            "decisions_answered": self.decisions_answered,
            "decisions_stored": self.decisions_stored,
            "recovery_s": self.recovery_s,
            "started_s": round(self.started_s, 1),
            "duration_s": round(self.ended_s - self.started_s, 1),
            "measured": self.measured,
            "events": self.events,
            "timeline": self.timeline,
        }


def summary_table(results: Sequence[dict[str, Any]]) -> str:
    """The table printed at the end of a rehearsal, from ``result.json``'s scenarios."""
    header = (
        "| scenario | passed | requests | failed | p50 ms | p99 ms | req/s "
        "| decisions answered / stored | recovery s |"
    )
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        recovery = "" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
        lines.append(
            f"| {r['name']} | {'yes' if r['passed'] else '**no**'} | {r['requests']} "
            f"| {r['failed']} | {_cell(r['p50_ms'])} | {_cell(r['p99_ms'])} "
            f"| {r['throughput_rps']:.1f} "
            f"| {r['decisions_answered']} / {r['decisions_stored']} | {recovery} |"
        )
    failed = [
        f"- {r['name']}: {check}" for r in results for check, ok in r["checks"].items() if not ok
    ]
    if failed:
        lines += ["", "Checks that did not hold:", *failed]
    goals = [
        f"- {r['name']}: {goal}: {'met' if met else 'NOT met'}"
        for r in results
        for goal, met in r.get("goals", {}).items()
    ]
    if goals:
        lines += ["", "Speed goals (figures, not checks):", *goals]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"
