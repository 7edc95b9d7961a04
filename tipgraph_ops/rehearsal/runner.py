"""Run a rehearsal: stub, cluster, deploy, scenarios, ``result.json`` and ``timeline.png``."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from tipgraph.serve_config import SERVE_ENV
from tipgraph.settings import StoreSettings, TipgraphSettings, load_settings, merge_overlay
from tipgraph.store import open_store
from tipgraph_ops.k3s import BASE_CONFIG, serve_config_v2
from tipgraph_ops.rehearsal.cluster import LocalCluster, free_port
from tipgraph_ops.rehearsal.plot import draw_timeline
from tipgraph_ops.rehearsal.result import ScenarioResult, per_second, summary_table, timeline_rows
from tipgraph_ops.rehearsal.scenarios import SCENARIOS, SHORT, Rig
from tipgraph_ops.rehearsal.serve_app import Sampler, ServeApp

OVERLAY = "configs/rehearsal.yaml"
CLUSTER_ENV = {
    # Replicas and handles report load every 2 s instead of 10: a scenario sees the
    # autoscaler act within seconds (configs/rehearsal.yaml's look_back_period_s is 12).
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "2",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "2",
    # A lost node is declared dead after 3 missed 1 s health checks, not 5 of 3 s.
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_USAGE_STATS_ENABLED": "0",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


@dataclass(frozen=True)
class RehearsalOptions:
    root: Path
    out_dir: Path
    store_url: str
    scenarios: Sequence[str] = tuple(SCENARIOS)
    llm_latency_s: float = 0.5
    concurrency: int = 16
    restart_database: Sequence[str] = ()

    @property
    def short(self) -> bool:
        return tuple(self.scenarios) == SHORT


def default_restart_command() -> list[str]:
    """``pg_ctlcluster <version> main restart`` for the one local cluster, if there is one."""
    versions = sorted(Path("/etc/postgresql").glob("*"))
    if not versions:
        return []
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main", "restart"]


class OllamaStubProcess:
    """``python -m tests.ollama_stub`` in "slow" mode: every completion takes the latency."""

    def __init__(self, root: Path, latency_s: float, log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.ollama_stub",
                "--mode",
                "slow",
                "--delay-s",
                str(latency_s),
            ],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().decode().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise RuntimeError(f"the Ollama stub did not start; see {log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self._log.close()


class StoreCheck:
    """Which answered decisions the store holds, waiting for the writers to catch up."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings

    def stored(self, event_ids: Sequence[str], timeout_s: float) -> int:
        missing = set(event_ids)
        deadline = time.monotonic() + timeout_s
        store = open_store(self.settings)
        try:
            while True:
                missing = {e for e in missing if store.get_decision(e) is None}
                if not missing or time.monotonic() >= deadline:
                    return len(event_ids) - len(missing)
                time.sleep(2.0)
        finally:
            store.close()


def run_rehearsal(options: RehearsalOptions, log: Any = print) -> dict[str, Any]:
    """Run the scenarios in order; write ``result.json`` and ``timeline.png``; return the
    result.  Everything started here is stopped before it returns."""
    out = options.out_dir
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    schema = f"rehearsal_{datetime.now(UTC):%Y%m%d_%H%M%S}"
    run_overlay = out / "run.yaml"
    base_overlay = {
        "serve": {"port": free_port()},
        "store": {"url": options.store_url, "pg_schema": schema, "spill_dir": str(out / "spill")},
    }
    run_overlay.write_text(yaml.safe_dump(base_overlay), encoding="utf-8")
    overlays = [OVERLAY, str(run_overlay)]
    settings = _settings(options.root, overlays)
    token = secrets.token_urlsafe(16)
    t0 = time.monotonic()
    stub = OllamaStubProcess(options.root, options.llm_latency_s, out / "ollama-stub.log")
    env = {
        **os.environ,
        **SERVE_ENV,
        **CLUSTER_ENV,
        "PYTHONPATH": str(options.root),
        # HAProxy's own listeners (Ray binds them on every interface, fixed ports 9101 and
        # 8404 by default): free ports, so nothing else on the machine is in the way.
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "TIPGRAPH_API_TOKEN": token,
        "TIPGRAPH_PRIVACY__USER_KEY_SECRET": secrets.token_hex(32),
        "OLLAMA_API_BASE": stub.url,
    }
    results: list[ScenarioResult] = []
    error: str | None = None
    cluster = LocalCluster(out / "nodes", env, ray_bin=Path(sys.executable).parent / "ray")
    sampler: Sampler | None = None
    try:
        log(f"starting a Ray cluster of {1 + cluster.workers} nodes ({cluster.dashboard_url})")
        cluster.start()
        t0 = time.monotonic()

        def now() -> float:
            return time.monotonic() - t0

        app = ServeApp(
            cluster.dashboard_url,
            settings.serve.app_name,
            Path(sys.executable).parent / "serve",
            env=cluster.env,
            headers=cluster.headers,
        )

        def deploy(
            change: dict[str, Any] | None,
        ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
            # A change goes into the run's overlay file, as an operator edits
            # configs/k3s/<env>.yaml: the app's args (file names) stay the same, so Serve
            # updates what changed in place instead of rebuilding the app.
            if change is not None:
                current = yaml.safe_load(run_overlay.read_text(encoding="utf-8"))
                run_overlay.write_text(yaml.safe_dump(merge_overlay(current, change)))
            config = out / "serve-config.yaml"
            rendered = serve_config_v2(_settings(options.root, overlays), overlays)
            config.write_text(rendered)
            app.deploy(config)
            deployments = yaml.safe_load(rendered)["applications"][0]["deployments"]
            # Once applied, every deployment reports these in its config (REST API).
            expected = {
                d["name"]: {
                    "user_config": d.get("user_config"),
                    "autoscaling_config.max_replicas": d["autoscaling_config"]["max_replicas"],
                }
                for d in deployments
            }
            return {"config": BASE_CONFIG, "overlays": overlays}, expected

        log("serve deploy (the dashboard's REST API, as KubeRay does)")
        args, expected = deploy(None)
        waited = app.wait_running(args, timeout_s=300, options=expected)
        log(f"app running after {waited:.0f} s")
        sampler = Sampler(app, now, interval_s=1.0, also=cluster.remember_all).start()
        rig = Rig(
            settings=settings,
            cluster=cluster,
            app=app,
            sampler=sampler,
            store=StoreCheck(settings.store),
            url=f"http://127.0.0.1:{settings.serve.port}",
            token=token,
            now=now,
            redeploy=deploy,
            restart_database=list(options.restart_database) or default_restart_command(),
            llm_latency_s=options.llm_latency_s,
            concurrency=options.concurrency,
            short=options.short,
            log=log,
        )
        for name in options.scenarios:
            log(f"scenario {name}")
            result = SCENARIOS[name](rig)
            results.append(result)
            log(f"  {'passed' if result.passed else 'FAILED'}")
    except Exception as err:  # written into result.json, so a failed run is still read
        error = f"{type(err).__name__}: {err}"
        log(f"rehearsal stopped: {error}")
    finally:
        if sampler is not None:
            sampler.stop()
        cluster.stop()
        stub.stop()
    end = time.monotonic() - t0
    outcomes = [o for r in results for o in r.outcomes]
    scenarios = [r.to_json() for r in results]
    document: dict[str, Any] = {
        "title": f"tipgraph rehearsal, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: "
        f"{options.concurrency} clients, {options.llm_latency_s * 1000:.0f} ms LLM",
        "passed": error is None
        and len(results) == len(options.scenarios)
        and all(r.passed for r in results),
        "error": error,
        "options": {
            "scenarios": list(options.scenarios),
            "llm_latency_s": options.llm_latency_s,
            "concurrency": options.concurrency,
            "nodes": 1 + cluster.workers,
            "store": "postgres",
        },
        "scenarios": scenarios,
        "replicas": timeline_rows(sampler.samples if sampler else [], 0.0, end),
        "series": per_second(outcomes, 0.0, end),
    }
    (out / "result.json").write_text(json.dumps(document, indent=2), encoding="utf-8")
    draw_timeline(document, out / "timeline.png")
    log("\n" + summary_table(scenarios))
    return document


def _settings(root: Path, overlays: Sequence[str]) -> TipgraphSettings:
    return load_settings(root / BASE_CONFIG, [root / o for o in overlays])
