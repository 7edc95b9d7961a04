"""Where the graph's time per request goes (``make bench-profile``).

Starts ``tipgraph serve`` on the embedded defaults, drives it at concurrency 16, and
reports for every process of the local cluster (Serve replicas, controller, raylet, GCS):

* CPU milliseconds per request, from ``/proc/<pid>/stat`` before and after the load, so
  the hops that cost CPU are visible without sampling error;
* resident memory (RSS) per process after the load;
* with py-spy, each replica's on-CPU samples grouped by the layer the leaf frame is in
  (Ray core, Serve, gRPC, asyncio, FastAPI/Starlette, pydantic, tipgraph, numpy, ...).

With ``--rounds N`` (``make bench-cpu``) it measures issue 21's goal 1 instead: the graph
and the single-process baseline (``bench/baseline_app.py``) alternate in ABBA order, each
started fresh on a store of its own, without py-spy.  Each serves the load once to settle
(the autoscaler adds its replicas), then again, measured: CPU ms per tip summed over the
server's whole process tree (for the graph: the driver, GCS, raylet, dashboard and agents,
every replica, HAProxy) and requests/s at the given concurrency.  The table gives medians,
and the graph/baseline throughput ratio paired by round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.bench_graph import (
    ROOT,
    Run,
    checkout_commit,
    drive,
    free_port,
    run_header,
    start,
    wait_ready,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SETTLE_S = 10.0
"""Pause between the settling load and the measured one (Serve's upscale delay is 5 s)."""
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
# Leaf-frame file path fragment -> layer; first match wins.
LAYERS = (
    ("grpc/", "gRPC"),
    ("ray/serve/", "Serve"),
    ("ray/", "Ray core"),
    ("asyncio/", "asyncio"),
    ("uvicorn/", "uvicorn"),
    ("starlette/", "FastAPI/Starlette"),
    ("fastapi/", "FastAPI/Starlette"),
    ("pydantic", "pydantic"),
    ("tipgraph/", "tipgraph"),
    ("deployments/", "tipgraph"),
    ("numpy/", "numpy"),
    ("sqlite3/", "SQLite"),
    ("pickle", "pickle"),
    ("logging/", "logging"),
    ("threading.py", "threads"),
    ("selectors.py", "asyncio"),
    ("contextlib.py", "contextlib"),
)


@dataclass(frozen=True)
class Proc:
    pid: int
    name: str


def cluster_processes() -> list[Proc]:
    """Every Ray and Serve process on this machine, named by its title."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        match = re.search(r"ray::(ServeReplica:\S+|ServeController|ProxyActor\S*)", args)
        if match:
            found.append(Proc(int(pid), match.group(1)))
        elif "/raylet" in args.split(" ")[0] or "gcs_server" in args.split(" ")[0]:
            found.append(Proc(int(pid), Path(args.split(" ")[0]).name))
        elif "bin/tipgraph serve" in args:
            found.append(Proc(int(pid), "driver (tipgraph serve)"))
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB / 1024


def layer(frame: str) -> str:
    """The layer of a py-spy frame, ``function (path/to/file.py:line)``."""
    path = frame.rpartition("(")[2]
    for fragment, name in LAYERS:
        if path.startswith(fragment) or f"/{fragment}" in path:
            return name
    return path.partition(":")[0] or "other"


def py_spy_layers(raw: Path) -> Counter[str]:
    """On-CPU samples per layer of the leaf frame, from py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[layer(stack.rsplit(";", 1)[-1])] += int(count)
    return counts


@dataclass(frozen=True)
class CpuRun:
    run: Run
    cpu_ms_per_tip: float
    processes: int
    started_during: int
    """Processes that appeared during the measured load (counted from zero)."""
    by_name: dict[str, float]
    """CPU ms per tip by process name."""


def process_tree(root: int) -> list[Proc]:
    """``root`` and every process under it: for ``tipgraph serve``, the whole local cluster
    (GCS, raylet, dashboard and agents, every replica, HAProxy)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True)
    children: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for line in out.stdout.splitlines():
        pid, ppid, args = [*line.split(None, 2), ""][:3]
        children[int(ppid)].append((int(pid), process_name(args)))
    found, todo = [Proc(root, "server (tipgraph serve or uvicorn)")], [root]
    while todo:
        for child, name in children.get(todo.pop(), []):
            found.append(Proc(child, name))
            todo.append(child)
    return found


def process_name(args: str) -> str:
    """A Ray worker's title (``ServeReplica:tipgraph:ingress``), else the program and, for
    Python, its script (``dashboard/agent.py``)."""
    # A worker's title names the task it runs (``ServeController.listen_for_change``).
    if match := re.search(r"ray::([^\s.]+)", args):
        return re.sub(r"ServeReplica:[^:]+:", "replica ", match.group(1))
    words = args.split()
    if not words:
        return "?"
    program = Path(words[0]).name
    script = next((w for w in words[1:] if w.endswith(".py")), None)
    if program.startswith("python") and script is not None:
        return "/".join(Path(script).parts[-2:])
    return program


def cpu_run(
    kind: str,
    requests: int,
    concurrency: int,
    tmp: Path,
    root: Path = ROOT,
    extra_env: dict[str, str] | None = None,
) -> CpuRun:
    """Start ``kind`` ("graph" or "baseline") on a store of its own, let it settle under the
    same load, and measure the CPU every one of its processes spends on ``requests`` tips."""
    tmp.mkdir()
    port = free_port()
    process = start(kind, port, tmp, extra_env, root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        # The load of the measurement first, so that the replicas the autoscaler adds for
        # it are up before it starts: their start-up is not a cost per tip.
        asyncio.run(drive(url, concurrency, requests))
        time.sleep(SETTLE_S)
        procs = process_tree(process.pid)
        before = {p.pid: cpu_seconds(p.pid) for p in procs}
        run = asyncio.run(drive(url, concurrency, requests))
        after = process_tree(process.pid)
        by_name: dict[str, float] = defaultdict(float)
        for p in after:
            by_name[p.name] += (cpu_seconds(p.pid) - before.get(p.pid, 0.0)) * 1000 / requests
        return CpuRun(
            run, sum(by_name.values()), len(after), len(after) - len(procs), dict(by_name)
        )
    finally:
        process.terminate()
        process.wait(60)


def cpu_table(
    requests: int, concurrency: int, rounds: int, tmp: Path, before: Path | None = None
) -> None:
    """``before``: a checkout of an earlier commit whose graph runs in the same rounds."""
    servers = {
        "baseline": ("baseline", ROOT, {}),
        "graph": ("graph", ROOT, {}),
        "graph, no shadows": ("graph", ROOT, {"TIPGRAPH_SHADOWS": "[]"}),
    }
    if before is not None:
        servers[f"graph at {checkout_commit(before)}"] = ("graph", before, {})
    names = list(servers)
    runs: dict[str, list[CpuRun]] = {name: [] for name in names}
    for round_ in range(rounds):
        for n, name in enumerate(names if round_ % 2 == 0 else names[::-1]):
            kind, root, env = servers[name]
            run = cpu_run(kind, requests, concurrency, tmp / f"{round_}-{n}", root, env)
            runs[name].append(run)
    print(
        f"| server | CPU ms per tip | per round | req/s c = {concurrency} | per round "
        f"| vs baseline, paired | processes | started during | errors "
        f"|  (median of {rounds} rounds, ABBA)"
    )
    print("| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for kind in names:
        group = runs[kind]
        cpu = [r.cpu_ms_per_tip for r in group]
        rps = [r.run.rps for r in group]
        paired = statistics.median(
            g.run.rps / b.run.rps for g, b in zip(group, runs["baseline"], strict=True)
        )
        print(
            f"| {kind} | **{statistics.median(cpu):.2f}** | {', '.join(f'{v:.2f}' for v in cpu)} "
            f"| {statistics.median(rps):.1f} | {', '.join(f'{v:.1f}' for v in rps)} "
            f"| **{paired:.2f}×** | {group[-1].processes} "
            f"| {sum(r.started_during for r in group)} | {sum(r.run.errors for r in group)} |",
            flush=True,
        )
    print(f"\n| process | {' | '.join(names)} |  (CPU ms per tip, medians)")
    print("| --- |" + " ---: |" * len(names))
    processes = sorted({n for group in runs.values() for r in group for n in r.by_name})
    for process in processes:
        cells = [
            statistics.median(r.by_name.get(process, 0.0) for r in runs[name]) for name in names
        ]
        if max(cells) >= 0.01:
            print(f"| {process} | {' | '.join(f'{c:.2f}' for c in cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10, help="py-spy window")
    parser.add_argument("--no-py-spy", action="store_true")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the graph")
    parser.add_argument("--keep", type=Path, default=None, help="copy py-spy's raw files here")
    parser.add_argument(
        "--candidates", type=int, default=None, help="tips asked per request (LLM mode)"
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="CPU per tip against the baseline, N rounds"
    )
    parser.add_argument(
        "--before", type=Path, default=None, help="with --rounds: an earlier checkout's graph too"
    )
    args = parser.parse_args()
    if args.rounds:
        print(run_header(f"{args.requests} tips at c = {args.concurrency}"), flush=True)
        with tempfile.TemporaryDirectory() as tmp_dir:
            cpu_table(args.requests, args.concurrency, args.rounds, Path(tmp_dir), args.before)
        return
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        port = free_port()
        extra_env = dict(item.split("=", 1) for item in args.env)
        process = start("graph", port, tmp, extra_env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            asyncio.run(drive(url, 8, 200))
            procs = cluster_processes()
            before = {p.pid: cpu_seconds(p.pid) for p in procs}
            spies: list[tuple[Proc, Path, subprocess.Popen[bytes]]] = []
            if py_spy and not args.no_py_spy:
                for p in procs:
                    if p.name.startswith("ServeReplica"):
                        out = tmp / f"{p.pid}.txt"
                        command = [py_spy, "record", "--pid", str(p.pid), "--format", "raw"]
                        command += ["--duration", str(args.seconds), "--rate", "100"]
                        command += ["--nonblocking", "--output", str(out)]
                        spy = subprocess.Popen(
                            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                        )
                        spies.append((p, out, spy))
            result: list[object] = []
            load = threading.Thread(
                target=lambda: result.append(
                    asyncio.run(drive(url, args.concurrency, args.requests, args.candidates))
                )
            )
            load.start()
            load.join()
            after = {p.pid: cpu_seconds(p.pid) for p in procs}
            ready = httpx.get(f"{url}/readyz").json()
            print(f"mean requests per remote call: {ready.get('mean_batch_size')}")
            run = result[0]
            for _, _, spy in spies:
                spy.wait()
            print(
                f"{args.requests} tips at concurrency {args.concurrency}: "
                f"{run.rps:.1f} req/s, p50 {run.pct(50):.1f} ms\n"
            )  # type: ignore[attr-defined]
            print("| process | CPU ms per request | RSS MiB |")
            print("| --- | ---: | ---: |")
            total = 0.0
            rows = defaultdict(float)
            for p in procs:
                ms = (after[p.pid] - before[p.pid]) * 1000 / args.requests
                total += ms
                rows[p.name] += ms
                print(f"| {p.name} | {ms:.2f} | {rss_mib(p.pid):.0f} |")
            print(f"| **all** | **{total:.2f}** | |\n")
            for p, out, _ in spies:
                if not out.exists():
                    continue
                if args.keep:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(out, args.keep / f"{p.name.split(':')[-1]}.txt")
                counts = py_spy_layers(out)
                n = sum(counts.values()) or 1
                top = ", ".join(f"{name} {100 * c / n:.0f}%" for name, c in counts.most_common(8))
                print(f"* {p.name}: {top}")
        finally:
            process.terminate()
            process.wait(60)


if __name__ == "__main__":
    main()
