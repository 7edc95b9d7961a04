"""``timeline.png``: replicas per stage, req/s and p99 against time, events marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STAGES = ("ingress", "context", "generation", "scoring")
OFFSET = 0.04
"""Stages with the same count would hide each other: each line is shifted this much."""


def draw_timeline(result: dict[str, Any], path: Path) -> None:
    """Draw from ``result.json``'s content alone, so a stored result can be redrawn."""
    # heavy: only a process that plots loads Matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    events = [e for scenario in result["scenarios"] for e in scenario["events"]]
    notes = 0.2 + 0.16 * len(events)  # inches for the numbered list of events
    figure = Figure(figsize=(12, 9 + notes), layout="constrained")
    replicas_ax, rps_ax, p99_ax, notes_ax = figure.subplots(
        4, 1, height_ratios=(3.2, 2.6, 2.6, notes)
    )
    rps_ax.sharex(replicas_ax)
    p99_ax.sharex(replicas_ax)
    end = max((row["t"] for row in result["series"]), default=0.0)
    for index, stage in enumerate(STAGES):
        rows = [r for r in result["replicas"] if r["deployment"] == stage]
        if not rows:
            continue
        shift = (index - (len(STAGES) - 1) / 2) * OFFSET
        times = [r["t"] for r in rows] + [end]
        counts = [r["replicas"] + shift for r in rows] + [rows[-1]["replicas"] + shift]
        replicas_ax.step(times, counts, where="post", label=stage, linewidth=2)
    replicas_ax.set_ylabel("running replicas")
    if replicas_ax.get_legend_handles_labels()[0]:
        replicas_ax.legend(loc="lower left", ncols=len(STAGES), fontsize=9)
    top = max((r["replicas"] for r in result["replicas"]), default=1)
    replicas_ax.set_yticks(range(0, top + 1))
    replicas_ax.set_ylim(0, top + 0.8)

    seconds = [row["t"] for row in result["series"]]
    rps_ax.plot(seconds, [row["rps"] for row in result["series"]], color="tab:blue")
    failed = [(row["t"], row["failed"]) for row in result["series"] if row["failed"]]
    if failed:
        rps_ax.bar(*zip(*failed, strict=True), color="tab:red", width=1.0, label="failed")
        rps_ax.legend(loc="upper right")
    rps_ax.set_ylabel("answered req/s")
    p99 = [row["p99_ms"] if row["p99_ms"] is not None else float("nan") for row in result["series"]]
    p99_ax.plot(seconds, p99, color="tab:purple")
    p99_ax.set_ylabel("p99 ms (per second)")
    p99_ax.set_xlabel("seconds since the cluster came up")

    for n, scenario in enumerate(result["scenarios"]):
        for ax in (replicas_ax, rps_ax, p99_ax):
            ax.axvspan(
                scenario["started_s"],
                scenario["started_s"] + scenario["duration_s"],
                color="tab:green" if scenario["passed"] else "tab:red",
                alpha=0.06 if n % 2 else 0.12,
            )
        replicas_ax.text(
            scenario["started_s"],
            top + (0.5 if n % 2 else 0.25),  # staggered: short scenarios sit side by side
            scenario["name"] + ("" if scenario["passed"] else " (FAILED)"),
            fontsize=9,
            fontweight="bold",
        )
    for number, event in enumerate(events, start=1):
        for ax in (replicas_ax, rps_ax, p99_ax):
            ax.axvline(event["t"], color="grey", linestyle=":", linewidth=0.8)
        p99_ax.annotate(
            str(number),
            (event["t"], 0.97),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            ha="right",
            va="top",
            color="dimgrey",
        )
    legend = "\n".join(f"{n}. {e['t']:.0f} s: {e['event']}" for n, e in enumerate(events, 1))
    notes_ax.axis("off")
    notes_ax.text(0.0, 1.0, legend, fontsize=8, va="top", family="monospace")
    figure.suptitle(result.get("title", "tipgraph rehearsal"))
    FigureCanvasAgg(figure).print_png(str(path))
