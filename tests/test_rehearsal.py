"""The multi-node rehearsal (tipgraph_ops/rehearsal): its arithmetic without a cluster,
and the short form (scale-out and in of generation alone, node loss) on a real one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tipgraph.settings import load_settings
from tipgraph_ops.rehearsal.cluster import ProcessId, _descendants
from tipgraph_ops.rehearsal.load import Outcome
from tipgraph_ops.rehearsal.plot import draw_timeline
from tipgraph_ops.rehearsal.result import (
    LoadFigures,
    Sample,
    ScenarioResult,
    per_second,
    summary_table,
    timeline_rows,
)
from tipgraph_ops.rehearsal.runner import OVERLAY
from tipgraph_ops.rehearsal.scenarios import _busiest_worker

ROOT = Path(__file__).resolve().parents[1]


def ok(started: float, latency_s: float) -> Outcome:
    return Outcome(started, latency_s, 200, event_id=f"e{started}", policy_version="v1")


def test_load_figures_count_the_window_and_take_latency_from_answers_only() -> None:
    outcomes = [ok(t / 10, 0.5 + t / 1000) for t in range(100)]  # 10 s of answers
    outcomes += [Outcome(2.5, 10.0, 0, error="ReadTimeout"), Outcome(11.0, 0.1, 503)]
    figures = LoadFigures.of(outcomes, 0.0, 10.0)
    assert figures.requests == 101 and figures.failed == 1
    assert figures.throughput_rps == 10.0
    assert figures.p50_ms == pytest.approx(549.5, abs=0.1)  # the timeout is not a latency
    assert figures.p99_ms is not None and figures.p99_ms < 600


def test_per_second_rows_carry_failures_for_the_picture() -> None:
    rows = per_second([ok(0.2, 0.1), ok(1.5, 0.3), Outcome(1.7, 0.0, 0)], 0.0, 2.0)
    assert [(r["t"], r["rps"], r["failed"]) for r in rows] == [(0, 1.0, 0), (1, 1.0, 1)]


def test_the_timeline_records_each_change_of_replicas() -> None:
    samples = [
        Sample(0.0, {"generation": 1, "context": 1}),
        Sample(1.0, {"generation": 1, "context": 1}),
        Sample(2.0, {"generation": 2, "context": 1}),
        Sample(3.0, {"generation": 3, "context": 1}),
        Sample(9.0, {"generation": 1, "context": 1}),
    ]
    rows = timeline_rows(samples, 0.5, 9.0)
    assert rows == [
        {"t": 1.0, "deployment": "context", "replicas": 1},
        {"t": 1.0, "deployment": "generation", "replicas": 1},
        {"t": 2.0, "deployment": "generation", "replicas": 2},
        {"t": 3.0, "deployment": "generation", "replicas": 3},
        {"t": 9.0, "deployment": "generation", "replicas": 1},
    ]


def scenario(checks: dict[str, bool]) -> ScenarioResult:
    return ScenarioResult(
        name="node-loss",
        started_s=10.0,
        ended_s=40.0,
        checks=checks,
        figures=LoadFigures.of([ok(11.0, 0.6)], 10.0, 40.0),
        decisions_answered=1,
        decisions_stored=1,
        timeline=[{"t": 10.0, "deployment": "generation", "replicas": 2}],
        events=[{"t": 20.0, "event": "SIGKILL raylet of worker-1"}],
        recovery_s=12.5,
    )


def test_a_scenario_passes_only_when_it_checked_something_and_all_held() -> None:
    assert scenario({"a": True}).passed
    assert not scenario({"a": True, "b": False}).passed
    assert not scenario({}).passed


def test_speed_goals_are_reported_but_never_fail_a_scenario() -> None:
    result = scenario({"a": True})
    result.goals = {"served p50 <= 600 ms": False}
    assert result.passed
    assert result.to_json()["goals"] == {"served p50 <= 600 ms": False}
    assert "- node-loss: served p50 <= 600 ms: NOT met" in summary_table([result.to_json()])


def test_the_summary_names_every_check_that_did_not_hold() -> None:
    table = summary_table([scenario({"replicas came back": False}).to_json()])
    assert "| node-loss | **no** | 1 | 0 | 600 |" in table
    assert "- node-loss: replicas came back" in table


def test_result_json_has_the_fields_the_runbook_reads() -> None:
    document = scenario({"a": True}).to_json()
    assert {
        "passed", "timeline", "requests", "failed", "p50_ms", "p99_ms",
        "decisions_answered", "decisions_stored", "recovery_s",
    } <= document.keys()  # fmt: skip
    json.dumps(document)


def test_the_timeline_picture_draws_from_result_json_alone(tmp_path: Path) -> None:
    document = {
        "title": "test",
        "scenarios": [scenario({"a": True}).to_json(), scenario({"a": False}).to_json()],
        "replicas": [
            {"t": 0.0, "deployment": "generation", "replicas": 1},
            {"t": 15.0, "deployment": "generation", "replicas": 3},
            {"t": 0.0, "deployment": "context", "replicas": 1},
        ],
        "series": per_second([ok(t / 4, 0.6) for t in range(160)], 0.0, 40.0),
    }
    path = tmp_path / "timeline.png"
    draw_timeline(document, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_node_to_kill_is_the_worker_with_most_replicas() -> None:
    sample = Sample(
        0.0,
        {"generation": 2, "context": 1},
        {"generation": ["n1", "n2"], "context": ["n2"], "ingress": ["n0"]},
    )
    ids = {"head": "n0", "worker-1": "n1", "worker-2": "n2"}
    assert _busiest_worker(sample, ids) == "worker-2"
    assert _busiest_worker(Sample(0.0, {}, {"ingress": ["n0"] * 5}), ids) in (
        "worker-1",
        "worker-2",
    )


def test_a_nodes_processes_are_found_through_its_session_and_parents() -> None:
    # A process in a session of its own with a child, as `ray start --block` runs a node.
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys,time; "
         "subprocess.Popen([sys.executable,'-c','import time; time.sleep(30)']); time.sleep(30)"],
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while len(found := _descendants(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert parent.pid in found and len(found) == 2
        proc = ProcessId.read(parent.pid)
        assert proc is not None and proc.alive()
    finally:
        os.killpg(parent.pid, 9)
        parent.wait()
    assert not proc.alive()
    assert not ProcessId(parent.pid, "0").alive()  # a recycled PID is not ours


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.rehearsal
def test_the_short_rehearsal_scales_generation_alone_and_survives_a_node_loss(
    tmp_path: Path,
) -> None:
    out = tmp_path / "rehearsal"
    process = subprocess.run(
        [str(Path(sys.executable).parent / "tipgraph"), "rehearse", "--short", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert (out / "result.json").exists(), process.stdout[-3000:] + process.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    scale, loss = result["scenarios"]
    assert (scale["name"], loss["name"]) == ("scale-out-and-in", "node-loss")

    # Generation alone scaled, to its max, and back; nothing failed, nothing was lost.
    stages = load_settings(ROOT / "configs/tipgraph.yaml", [ROOT / OVERLAY]).deployments
    bounds = {
        n: (d.autoscaling.min_replicas, d.autoscaling.max_replicas) for n, d in stages.items()
    }
    most = scale["measured"]["max_replicas_under_load"]
    assert most["generation"] == bounds["generation"][1]
    assert (most["context"], most["scoring"]) == (bounds["context"][0], bounds["scoring"][0])
    generation = [r["replicas"] for r in scale["timeline"] if r["deployment"] == "generation"]
    low, high = bounds["generation"]
    assert generation[0] == low and max(generation) == high and generation[-1] == low
    assert scale["measured"]["scale_in_s"] <= scale["measured"]["scale_in_bound_s"]
    assert scale["failed"] == 0
    assert scale["goals"] and scale["measured"]["steady_p50_ms"] > 0  # reported, not checked
    assert scale["decisions_answered"] == scale["decisions_stored"] > 0

    # The killed node's replicas came back elsewhere, and every answer is in the store.
    assert loss["measured"]["replicas_lost"], "the killed node ran no replica"
    assert loss["recovery_s"] is not None and loss["recovery_s"] < 180
    assert loss["decisions_answered"] == loss["decisions_stored"] > 0

    assert (out / "timeline.png").stat().st_size > 10_000
    assert "| scale-out-and-in |" in process.stdout
    failed = [c for s in result["scenarios"] for c, held in s["checks"].items() if not held]
    assert result["passed"], failed
    assert process.returncode == 0
