"""The Serve graph against a single-process baseline, in the same run (``make bench``).

Both serve the embedded defaults (task-mode tips, the two shipped shadows, every decision
logged to SQLite) behind the same bearer token, on loopback ports.  The graph is
``tipgraph serve``; the baseline is ``bench/baseline_app.py`` under uvicorn, calling the
same context, generation and scoring code in-process.  Each is driven over HTTP at
concurrency 1, 8, 16 and 32 with a fixed number of requests, and the table gives
requests/s, p50/p95/p99, errors, and the graph/baseline throughput ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests.factories import tip_body

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
CONCURRENCY = (1, 8, 16, 32)


@dataclass(frozen=True)
class Run:
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, p: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[p - 1] * 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    body = tip_body(user_id="warm")
    while time.monotonic() < deadline:
        try:
            response = httpx.post(
                f"{url}/v1/tips", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


async def drive(url: str, concurrency: int, requests: int) -> Run:
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for n in remaining:
            start = time.perf_counter()
            response = await client.post("/v1/tips", json=tip_body(user_id=f"bench-{n % 50}"))
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=120
    ) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Run(concurrency, requests, seconds, latencies, errors)


LEVERS: dict[str, dict[str, str]] = {
    # Explicit: `tipgraph serve` turns the throughput mode on unless told otherwise.
    "Serve defaults": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
    # Ray 2.60: gRPC between replicas, direct ingress, user code on the main loop, GC freeze.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED=1": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    # What the two shadow hops cost (not a lever to keep: shadows are the product).
    "optimized, no shadows": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "TIPGRAPH_SHADOWS": "[]"},
    # HAProxy in front of the ingress replicas instead of Serve's Python proxy actor.
    "+ HAProxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"},
    # Batched hops off: one remote call per request per stage, as before issue 8.
    "+ HAProxy, unbatched hops": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "TIPGRAPH_HOPS__MAX_BATCH_SIZE": "1",
    },
    "+ HAProxy, one batch in flight per hop": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "TIPGRAPH_HOPS__MAX_INFLIGHT_BATCHES": "1",
    },
}


def start(
    kind: str, port: int, tmp: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **(extra_env or {}),
        "TIPGRAPH_API_TOKEN": TOKEN,
        "TIPGRAPH_STORE__URL": f"sqlite:///{tmp}/{kind}.db",
        "TIPGRAPH_STORE__SPILL_DIR": str(tmp / "spill"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(ROOT),
    }
    bin_dir = Path(sys.executable).parent
    if kind == "graph":
        command = [str(bin_dir / "tipgraph"), "serve", "--port", str(port)]
    else:
        command = [
            str(bin_dir / "uvicorn"),
            "bench.baseline_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
    log = open(tmp / f"{kind}.log", "wb")  # noqa: SIM115 - the child owns it until it ends
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)


def measure(
    kind: str, requests: int, tmp: Path, extra_env: dict[str, str] | None = None
) -> list[Run]:
    port = free_port()
    process = start(kind, port, tmp, extra_env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        asyncio.run(drive(url, 8, 100))  # warm-up
        return [asyncio.run(drive(url, c, requests)) for c in CONCURRENCY]
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument(
        "--levers", action="store_true", help="also measure the graph under each lever"
    )
    parser.add_argument(
        "--lever", action="append", choices=sorted(LEVERS), help="measure only these levers"
    )
    parser.add_argument("--concurrency", type=int, action="append", help="default: 1 8 16 32")
    args = parser.parse_args()
    global CONCURRENCY
    CONCURRENCY = tuple(args.concurrency or CONCURRENCY)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    levers = LEVERS if args.levers else {"as shipped": {}}
    if args.lever:
        levers = {name: LEVERS[name] for name in args.lever}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        baseline = measure("baseline", args.requests, tmp)
        graphs = {name: measure("graph", args.requests, tmp, env) for name, env in levers.items()}
    print(
        f"## Graph vs single-process baseline: {datetime.now(UTC):%Y-%m-%d}, commit {commit}, "
        f"{os.cpu_count()} cores, {platform.machine()}, {args.requests} tips per level\n"
    )
    print(
        "| graph | concurrency | baseline req/s | graph req/s | ratio | graph p50 / p95 / p99 ms "
        "| baseline p50 / p95 / p99 ms | errors (graph, baseline) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | --- | --- |")
    for name, graph in graphs.items():
        for g, b in zip(graph, baseline, strict=True):
            print(
                f"| {name} | {g.concurrency} | {b.rps:.1f} | {g.rps:.1f} | "
                f"**{g.rps / b.rps:.2f}×** | "
                f"{g.pct(50):.0f} / {g.pct(95):.0f} / {g.pct(99):.0f} | "
                f"{b.pct(50):.0f} / {b.pct(95):.0f} / {b.pct(99):.0f} | {g.errors}, {b.errors} |"
            )


if __name__ == "__main__":
    main()
