"""``timeline.png``: replicas per stage, req/s and p99 against time, events marked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

STAGES = ("ingress", "context", "generation", "scoring")


def draw_timeline(result: dict[str, Any], path: Path) -> None:
    """Draw from ``result.json``'s content alone, so a stored result can be redrawn."""
    # heavy: only a process that plots loads Matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 8), layout="constrained")
    replicas_ax, rps_ax, p99_ax = figure.subplots(3, 1, sharex=True)
    end = max((row["t"] for row in result["series"]), default=0.0)
    for stage in STAGES:
        rows = [r for r in result["replicas"] if r["deployment"] == stage]
        if not rows:
            continue
        times = [r["t"] for r in rows] + [end]
        counts = [r["replicas"] for r in rows] + [rows[-1]["replicas"]]
        replicas_ax.step(times, counts, where="post", label=stage, linewidth=2)
    replicas_ax.set_ylabel("running replicas")
    if replicas_ax.get_legend_handles_labels()[0]:
        replicas_ax.legend(loc="upper left", ncols=len(STAGES))
    replicas_ax.set_yticks(
        range(0, 1 + max((r["replicas"] for r in result["replicas"]), default=1))
    )
    seconds = [row["t"] for row in result["series"]]
    rps_ax.plot(seconds, [row["rps"] for row in result["series"]], color="tab:blue")
    failed = [(row["t"], row["failed"]) for row in result["series"] if row["failed"]]
    if failed:
        rps_ax.bar(*zip(*failed, strict=True), color="tab:red", width=1.0, label="failed")
        rps_ax.legend(loc="upper left")
    rps_ax.set_ylabel("answered req/s")
    p99_ax.plot(
        seconds,
        [row["p99_ms"] if row["p99_ms"] is not None else float("nan") for row in result["series"]],
        color="tab:purple",
    )
    p99_ax.set_ylabel("p99 ms (per second)")
    p99_ax.set_xlabel("seconds since the cluster came up")
    for scenario in result["scenarios"]:
        for ax in (replicas_ax, rps_ax, p99_ax):
            ax.axvspan(
                scenario["started_s"],
                scenario["started_s"] + scenario["duration_s"],
                color="tab:green" if scenario["passed"] else "tab:red",
                alpha=0.06,
            )
        replicas_ax.text(
            scenario["started_s"],
            1.02,
            scenario["name"] + ("" if scenario["passed"] else " (FAILED)"),
            transform=replicas_ax.get_xaxis_transform(),
            fontsize=9,
        )
        for event in scenario["events"]:
            for ax in (replicas_ax, rps_ax, p99_ax):
                ax.axvline(event["t"], color="grey", linestyle=":", linewidth=0.8)
            p99_ax.annotate(
                event["event"][:40],
                (event["t"], 1.0),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=7,
                va="top",
                ha="right",
                color="dimgrey",
            )
    figure.suptitle(result.get("title", "tipgraph rehearsal"))
    FigureCanvasAgg(figure).print_png(str(path))
