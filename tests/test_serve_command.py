"""``tipgraph serve`` (what ``make run`` runs) as its own process: the README's curl examples
against it, ``tipgraph status`` on it, and Ctrl-C writing every decision before it exits."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.conftest import free_port
from tests.factories import tip_body
from tests.test_e2e import run_readme_curl_examples

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "serve-command-test-token"
STARTUP_S = 300


@dataclass
class Served:
    url: str
    ray_address: str
    metrics_url: str
    database: Path
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    """Every decision the tests were served."""


def _read_until(stream: IO[str], pattern: str, deadline: float) -> str:
    """Lines of ``stream`` up to the first one matching ``pattern``; fails at ``deadline``."""
    seen = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r}; output so far:\n{''.join(seen)}")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A running ``tipgraph serve``; the last test stops it."""
    tmp = tmp_path_factory.mktemp("serve")
    port, metrics_port = free_port(), free_port()
    database = tmp / "decisions.db"
    env = {
        **os.environ,
        "TIPGRAPH_API_TOKEN": TOKEN,
        "TIPGRAPH_SERVE__PORT": str(port),
        "TIPGRAPH_METRICS__EXPORT_PORT": str(metrics_port),
        # HAProxy's own ports are fixed per machine: the suite's Serve instance has them.
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "TIPGRAPH_STORE__URL": f"sqlite:///{database}",
        "TIPGRAPH_STORE__SPILL_DIR": str(tmp / "spill"),
        # Writes only on shutdown, so the test sees Ctrl-C drain the buffer.
        "TIPGRAPH_STORE__FLUSH_INTERVAL_S": "600",
        "TIPGRAPH_STORE__BATCH_SIZE": "100000",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tipgraph_ops.cli", "serve", "--num-cpus", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    try:
        banner = _read_until(process.stdout, "tipgraph is serving on", time.monotonic() + STARTUP_S)
        address = re.search(r"--ray-address (\S+)`", banner)
        metrics = re.search(r"Prometheus metrics: (\S+)\)", banner)
        assert address is not None and metrics is not None, banner
        assert metrics.group(1) == f"http://127.0.0.1:{metrics_port}/metrics"
        assert f"http://127.0.0.1:{port}" in banner and TOKEN not in banner
        served = Served(
            f"http://127.0.0.1:{port}", address.group(1), metrics.group(1), database, process
        )
        # Keep reading, or a chatty server would block on a full pipe.
        threading.Thread(target=served.output.extend, args=(process.stdout,), daemon=True).start()
        yield served
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_readme_curl_examples_work_against_tipgraph_serve(
    served: Served, tmp_path: Path
) -> None:
    result = run_readme_curl_examples(
        served.url, tmp_path, env={**os.environ, "TIPGRAPH_API_TOKEN": TOKEN}
    )
    assert '"reaction":"done"' in result.stdout and '"status":"ready"' in result.stdout
    served.event_ids.append(json.loads((tmp_path / "tip.json").read_text())["event_id"])


def test_status_shows_the_served_graph(served: Served, tmp_path: Path) -> None:
    url, address = served.url, served.ray_address
    for user in ("status-a", "status-b"):  # no feedback: they stay in the writer's buffer
        tip = httpx.post(
            f"{url}/v1/tips",
            json=tip_body(user_id=user),
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert tip.status_code == 200, tip.text
        served.event_ids.append(tip.json()["event_id"])
    command = ["status", "--url", url, "--ray-address", address, "--format", "json"]
    result = subprocess.run(
        [sys.executable, "-m", "tipgraph_ops.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # no registry database here: the champion is "none", nothing created
        env={
            **os.environ,
            "TIPGRAPH_STORE__URL": f"sqlite:///{served.database}",
            # Earlier tests in the session may have exported MLFLOW_TRACKING_URI.
            "TIPGRAPH_REGISTRY__TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""  # no third-party warnings or progress bars (docs/tuning.md)
    status = json.loads(result.stdout)
    (app,) = status["serve"]["data"]["apps"]
    assert app["name"] == "tipgraph" and app["status"] == "RUNNING", status
    assert {d["name"] for d in app["deployments"]} >= {"ingress", "context", "scoring"}, status
    assert status["registry"]["data"]["champion"] is None, status
    assert not (tmp_path / "mlflow.db").exists()
    assert status["decision_log"]["data"]["decision_log_backlog"] >= 2, status


def test_the_documented_metrics_endpoint_serves_tipgraph_metrics(served: Served) -> None:
    """The README's curl examples made one decision; Ray exports every few seconds."""
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(served.metrics_url, timeout=10).text
        if re.search(r'^ray_tipgraph_decisions_total\{[^}]*role="served"', text, re.MULTILINE):
            break
        time.sleep(2)
    served_series = re.findall(
        r'^ray_tipgraph_decisions_total\{([^}]*role="served"[^}]*)\} (\S+)$', text, re.MULTILINE
    )
    assert served_series, text[-2000:]
    assert sum(float(value) for _, value in served_series) >= 1
    assert all('policy="linucb"' in tags for tags, _ in served_series)
    assert "ray_tipgraph_stage_latency_ms_bucket" in text


def test_ctrl_c_writes_every_buffered_decision_and_exits_0(served: Served) -> None:
    """Last in the file: it stops the server the tests above used."""
    with sqlite3.connect(served.database) as db:
        before = {row[0] for row in db.execute("SELECT event_id FROM decisions")}
    assert len(served.event_ids) == 3 and not set(served.event_ids) <= before  # buffered
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(timeout=120) == 0
    assert any("flushing the decision log" in line for line in served.output), served.output
    with sqlite3.connect(served.database) as db:
        after = {row[0] for row in db.execute("SELECT event_id FROM decisions")}
    assert set(served.event_ids) <= after
