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
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from tests.factories import tip_body
from tests.ollama_stub import OllamaStub

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"
USER_KEY_SECRET = "bench-user-key-secret-synthetic-users-only"
CONCURRENCY = (1, 8, 16, 32)
HOPS = ("CONTEXT", "GENERATION", "SCORING", "SHADOWS")
STAGES = ("INGRESS", "CONTEXT", "GENERATION", "SCORING")


@dataclass(frozen=True)
class Run:
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    errors: int
    stage_ms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, p: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[p - 1] * 1000

    def stage_p50(self, stage: str) -> float:
        """Median of a stage's latency as the server reported it (``latency_ms``)."""
        return statistics.median(self.stage_ms[stage])


def checkout_commit(root: Path) -> str:
    """The short commit a checkout is at."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()


def run_header(details: str) -> str:
    """The heading of a benchmark's results: date, commit, machine, then ``details``."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"## {datetime.now(UTC):%Y-%m-%d}, commit {commit}, {os.cpu_count()} cores, "
        f"{platform.machine()}, {details}\n"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bench_body(n: int, candidates: int | None) -> dict[str, object]:
    """The request of tip ``n`` (50 users), asking for ``candidates`` tips if given."""
    if candidates is None:
        return tip_body(user_id=f"bench-{n % 50}")
    return tip_body(user_id=f"bench-{n % 50}", n_candidates=candidates)


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


async def drive(url: str, concurrency: int, requests: int, candidates: int | None = None) -> Run:
    latencies: list[float] = []
    stage_ms: dict[str, list[float]] = {}
    errors = 0
    remaining = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for n in remaining:
            start = time.perf_counter()
            response = await client.post("/v1/tips", json=bench_body(n, candidates))
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200
            if response.status_code != 200:
                continue
            answer = response.json()
            for stage, ms in answer["latency_ms"].items():
                stage_ms.setdefault(stage, []).append(ms)
            if candidates is not None and len(answer["ranking"]) != candidates:
                raise RuntimeError(f"asked for {candidates} candidates, got {answer['ranking']}")

    limits = httpx.Limits(max_connections=concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=120
    ) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return Run(concurrency, requests, seconds, latencies, errors, stage_ms)


HOPS_OFF = {f"TIPGRAPH_HOPS__{hop}__MAX_BATCH_SIZE": "1" for hop in HOPS}
LEVERS: dict[str, dict[str, str]] = {
    # What `tipgraph serve` does (tipgraph.serve_config.SERVE_ENV, configs/tipgraph.yaml).
    "as shipped": {},
    # Each row below undoes or changes one thing against "as shipped".
    "Serve's defaults (no throughput mode, Python proxy)": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
    },
    "Python proxy instead of HAProxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0"},
    "unbatched hops (one remote call per request and stage)": HOPS_OFF,
    "4 batches in flight per hop": {
        f"TIPGRAPH_HOPS__{hop}__MAX_INFLIGHT_BATCHES": "4" for hop in HOPS
    },
    "max_ongoing_requests 5 on every stage (Serve's default)": {
        f"TIPGRAPH_DEPLOYMENTS__{stage}__MAX_ONGOING_REQUESTS": "5" for stage in STAGES
    },
    "2 ingress replicas": {"TIPGRAPH_DEPLOYMENTS__INGRESS__AUTOSCALING__MIN_REPLICAS": "2"},
    "uvloop off (RAY_USE_UVLOOP=0)": {"RAY_USE_UVLOOP": "0"},
    "no shadows": {"TIPGRAPH_SHADOWS": "[]"},
}
THREE_SHADOWS = json.dumps(
    [
        {"policy": {"name": "egreedy", "kind": "egreedy", "epsilon": 0.1}},
        {"policy": {"name": "uniform", "kind": "uniform"}},
        {"policy": {"name": "softmax", "kind": "softmax"}},
    ]
)


def start(
    kind: str,
    port: int,
    tmp: Path,
    extra_env: dict[str, str] | None = None,
    root: Path = ROOT,
) -> subprocess.Popen[bytes]:
    """Start ``kind`` ("graph" or "baseline") from the code in ``root`` (another checkout:
    an earlier commit measured in the same run)."""
    env = {
        **os.environ,
        **(extra_env or {}),
        "TIPGRAPH_API_TOKEN": TOKEN,
        "TIPGRAPH_PRIVACY__USER_KEY_SECRET": USER_KEY_SECRET,
        "TIPGRAPH_STORE__URL": f"sqlite:///{tmp}/{kind}.db",
        "TIPGRAPH_STORE__SPILL_DIR": str(tmp / "spill"),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(root),
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
    return subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=log)


Plan = list[tuple[int, int | None]]
"""(concurrency, candidates per request or None for the default body), measured in order."""


def measure(
    kind: str,
    requests: int,
    tmp: Path,
    plan: Plan,
    extra_env: dict[str, str] | None = None,
    root: Path = ROOT,
) -> dict[tuple[int, int | None], Run]:
    port = free_port()
    process = start(kind, port, tmp, extra_env, root)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        asyncio.run(drive(url, 8, 100))  # warm-up
        return {(c, k): asyncio.run(drive(url, c, requests, k)) for c, k in plan}
    finally:
        process.terminate()
        process.wait(60)


def ms(run: Run) -> str:
    return f"{run.pct(50):.0f} / {run.pct(95):.0f} / {run.pct(99):.0f}"


def ratio_table(requests: int, tmp: Path) -> None:
    """Baseline and the graph as shipped at every concurrency, then shadows and K."""
    plan: Plan = [(c, None) for c in CONCURRENCY]
    baseline = measure("baseline", requests, tmp, plan)
    graph = measure("graph", requests, tmp, plan)
    print(
        "| concurrency | baseline req/s | graph req/s | ratio | graph p50 / p95 / p99 ms "
        "| baseline p50 / p95 / p99 ms | errors (graph, baseline) |"
    )
    print("| ---: | ---: | ---: | ---: | --- | --- | --- |")
    for key in plan:
        g, b = graph[key], baseline[key]
        print(
            f"| {key[0]} | {b.rps:.1f} | {g.rps:.1f} | **{g.rps / b.rps:.2f}×** | {ms(g)} "
            f"| {ms(b)} | {g.errors}, {b.errors} |"
        )
    candidates_table(requests, tmp)
    shadow_plan: Plan = [(1, None), (16, None)]
    shadows = {
        "0": measure("graph", requests, tmp, shadow_plan, {"TIPGRAPH_SHADOWS": "[]"}),
        "2 (shipped)": {key: graph[key] for key in shadow_plan},
        "3": measure("graph", requests, tmp, shadow_plan, {"TIPGRAPH_SHADOWS": THREE_SHADOWS}),
    }
    print(
        "\n| shadows | served p50 ms at c = 1 | vs 0 | p50 ms at c = 16 | vs 0 | req/s at c = 16 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in shadows.items():
        cells = []
        for c in (1, 16):
            p50, none = runs[(c, None)].pct(50), shadows["0"][(c, None)].pct(50)
            cells.append(f"{p50:.1f} | {100 * (p50 / none - 1):+.1f}%")
        print(f"| {name} | {' | '.join(cells)} | {runs[(16, None)].rps:.1f} |")


def candidates_table(requests: int, tmp: Path) -> None:
    """Served p50 at K = 5, 20, 50 candidates.  Task mode makes at most about 9 tips, so K
    comes from LLM mode against the local Ollama stub (an instant, local "LLM")."""
    candidates: Plan = [(c, k) for c in (1, 16) for k in (5, 20, 50)]
    with OllamaStub() as stub:
        runs = measure(
            "graph", requests, tmp, candidates, {"OLLAMA_API_BASE": stub.url, **LLM_INLINE_50}
        )
    print(
        "\n| K | p50 ms c = 1 | vs K = 5 | p50 ms c = 16 | vs K = 5 "
        "| scoring p50 ms c = 1 | generation p50 ms c = 1 |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in (5, 20, 50):
        cells = []
        for c in (1, 16):
            p50, five = runs[(c, k)].pct(50), runs[(c, 5)].pct(50)
            cells.append(f"{p50:.1f} | {100 * (p50 / five - 1):+.1f}%")
        one = runs[(1, k)]
        print(
            f"| {k} | {' | '.join(cells)} | {one.stage_p50('scoring'):.2f} "
            f"| {one.stage_p50('generation'):.2f} |"
        )


LLM_INLINE_50 = {
    "TIPGRAPH_GENERATION__SOURCE": "llm",
    "TIPGRAPH_GENERATION__SERVE_FROM": "inline",
    "TIPGRAPH_GENERATION__MAX_LLM_CANDIDATES": "50",
}


def candidates_rounds_table(requests: int, tmp: Path, rounds: int) -> None:
    """Issue 21's goal 3: served p50 at K = 50 against K = 5 at c = 16, in LLM mode through
    the Ollama stub, on one graph: the two alternate in ABBA order, ``rounds`` times.  The
    stub runs in a process of its own, as a model server would: in this one it would
    compete with the load for the GIL."""
    ks = (5, 50)
    runs: dict[int, list[Run]] = {k: [] for k in ks}
    stub = subprocess.Popen(
        [sys.executable, "-m", "tests.ollama_stub"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert stub.stdout is not None
        stub_url = stub.stdout.readline().strip()
        port = free_port()
        process = start("graph", port, tmp, {"OLLAMA_API_BASE": stub_url, **LLM_INLINE_50})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            asyncio.run(drive(url, 8, 100))  # warm-up
            for round_ in range(rounds):
                for k in ks if round_ % 2 == 0 else ks[::-1]:
                    runs[k].append(asyncio.run(drive(url, 16, requests, k)))
        finally:
            process.terminate()
            process.wait(60)
    finally:
        stub.terminate()
        stub.wait(10)
    print(
        "| K | p50 ms c = 16 | vs K = 5 | vs K = 5, paired | per round | scoring p50 ms "
        f"| generation p50 ms | req/s | errors |  (median of {rounds} rounds, ABBA)"
    )
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    five = statistics.median(r.pct(50) for r in runs[5])
    for k in ks:
        p50s = [r.pct(50) for r in runs[k]]
        paired = statistics.median(
            r.pct(50) / b.pct(50) - 1 for r, b in zip(runs[k], runs[5], strict=True)
        )
        p50 = statistics.median(p50s)
        print(
            f"| {k} | {p50:.1f} | {100 * (p50 / five - 1):+.1f}% | **{100 * paired:+.1f}%** "
            f"| {', '.join(f'{v:.1f}' for v in p50s)} "
            f"| {statistics.median(r.stage_p50('scoring') for r in runs[k]):.2f} "
            f"| {statistics.median(r.stage_p50('generation') for r in runs[k]):.2f} "
            f"| {statistics.median(r.rps for r in runs[k]):.1f} "
            f"| {sum(r.errors for r in runs[k])} |",
            flush=True,
        )


def lever_table(names: list[str], requests: int, tmp: Path) -> None:
    """Each lever against the same baseline, at concurrency 1 and 16."""
    plan: Plan = [(1, None), (16, None)]
    baseline = measure("baseline", requests, tmp, plan)
    print(
        "| graph | req/s c = 16 | ratio c = 16 | p50 / p95 / p99 ms c = 16 | p50 ms c = 1 "
        "| errors |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    b = baseline[(16, None)]
    print(
        f"| baseline (one process) | {b.rps:.1f} | 1.00× | {ms(b)} "
        f"| {baseline[(1, None)].pct(50):.1f} | {b.errors} |"
    )
    for name in names:
        runs = measure("graph", requests, tmp, plan, LEVERS[name])
        g = runs[(16, None)]
        print(
            f"| {name} | {g.rps:.1f} | **{g.rps / b.rps:.2f}×** | {ms(g)} "
            f"| {runs[(1, None)].pct(50):.1f} | {g.errors + runs[(1, None)].errors} |",
            flush=True,
        )


def durability_table(requests: int, tmp: Path, rounds: int) -> None:
    """What ``store.durability: durable`` (fsync before the answer) costs against
    ``buffered``: the two alternate, ``rounds`` times, and the table gives medians."""
    plan: Plan = [(1, None), (16, None)]
    modes = ("buffered", "durable")
    runs: dict[str, list[dict[tuple[int, int | None], Run]]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:  # interleaved: drift on a shared machine hits both alike
            runs[mode].append(
                measure("graph", requests, tmp, plan, {"TIPGRAPH_STORE__DURABILITY": mode})
            )
    print(
        f"| durability | c | req/s | p50 ms | p99 ms | vs buffered (req/s, p50, p99) "
        f"| errors |  (median of {rounds} interleaved rounds)"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")

    def median(mode: str, c: int, what: str) -> float:
        values = [
            r[(c, None)].rps if what == "rps" else r[(c, None)].pct(int(what)) for r in runs[mode]
        ]
        return statistics.median(values)

    for c in (1, 16):
        for mode in modes:
            rps, p50, p99 = (median(mode, c, w) for w in ("rps", "50", "99"))
            base = [median("buffered", c, w) for w in ("rps", "50", "99")]
            change = ", ".join(
                f"{100 * (v / b - 1):+.1f}%" for v, b in zip((rps, p50, p99), base, strict=True)
            )
            errors = sum(r[(c, None)].errors for r in runs[mode])
            print(f"| {mode} | {c} | {rps:.1f} | {p50:.1f} | {p99:.1f} | {change} | {errors} |")


def shadows_table(requests: int, tmp: Path, rounds: int, before: Path | None = None) -> None:
    """Served p50 with no shadows and with the two shipped shadows, at c = 1 and 16:
    interleaved rounds, medians, and each round's p50 (the noise to judge a 5% goal by).
    ``before``: a checkout of an earlier commit whose graph with shadows runs too."""
    configs: dict[str, tuple[dict[str, str], Path]] = {
        "no shadows": ({"TIPGRAPH_SHADOWS": "[]"}, ROOT),
        "2 shadows (shipped)": ({}, ROOT),
    }
    if before is not None:
        configs[f"2 shadows at {checkout_commit(before)}"] = ({}, before)
    plan: Plan = [(1, None), (16, None)]
    runs: dict[str, list[dict[tuple[int, int | None], Run]]] = {name: [] for name in configs}
    for round_ in range(rounds):
        # Interleaved, in ABBA order, each run on a store of its own: neither drift on a
        # shared machine nor a store grown by the runs before favours one configuration.
        order = list(configs.items()) if round_ % 2 == 0 else list(configs.items())[::-1]
        for name, (env, root) in order:
            store = tmp / f"shadows-{round_}-{len(runs[name])}-{name.replace(' ', '_')}"
            store.mkdir()
            runs[name].append(measure("graph", requests, store, plan, env, root))

    def p50s(name: str, c: int) -> list[float]:
        return [r[(c, None)].pct(50) for r in runs[name]]

    print(
        "| shadows | p50 ms c = 1 | vs none | vs none, paired | per round | p50 ms c = 16 "
        "| vs none | vs none, paired | per round | req/s c = 16 | errors "
        f"|  (median of {rounds} interleaved rounds)"
    )
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for name in configs:
        cells = []
        for c in (1, 16):
            p50, none = statistics.median(p50s(name, c)), statistics.median(p50s("no shadows", c))
            # Each round's own ratio, then their median: what a round's drift cannot move.
            paired = statistics.median(
                v / n - 1 for v, n in zip(p50s(name, c), p50s("no shadows", c), strict=True)
            )
            each = ", ".join(f"{v:.1f}" for v in p50s(name, c))
            cells.append(
                f"{p50:.1f} | {100 * (p50 / none - 1):+.1f}% | {100 * paired:+.1f}% | {each}"
            )
        rps = statistics.median(r[(16, None)].rps for r in runs[name])
        errors = sum(r[key].errors for r in runs[name] for key in plan)
        print(f"| {name} | {' | '.join(cells)} | {rps:.1f} | {errors} |", flush=True)


ONE_BATCH_IN_FLIGHT = {
    # The hops and autoscaling before issue 16: LLM generation keeps one batch out, and
    # context and generation scale on ongoing requests (a batch is one), target 1.
    "TIPGRAPH_HOPS__LLM_GENERATION__MAX_INFLIGHT_BATCHES": "1",
    **{
        f"TIPGRAPH_DEPLOYMENTS__{stage}__AUTOSCALING__{key}": value
        for stage in ("CONTEXT", "GENERATION")
        for key, value in (("SIGNAL", "requests"), ("TARGET_ONGOING_REQUESTS", "1"))
    },
}
LLM_LATENCY_S = 0.5


def load_signal_table(requests: int, tmp: Path, rounds: int) -> None:
    """Generation's hop before and after issue 16, in task mode and against a 0.5 s LLM
    (the Ollama stub in "slow" mode), at c = 16: interleaved rounds, medians."""
    configs = {"one batch in flight (before)": ONE_BATCH_IN_FLIGHT, "as shipped": {}}
    plan: Plan = [(16, None)]
    runs: dict[tuple[str, str], list[Run]] = {}
    with OllamaStub() as stub:
        stub.mode, stub.delay_s = "slow", LLM_LATENCY_S
        modes = {
            "tasks": {},
            "LLM 0.5 s": {
                "OLLAMA_API_BASE": stub.url,
                "TIPGRAPH_GENERATION__SOURCE": "mixed",
                "TIPGRAPH_GENERATION__SERVE_FROM": "inline",
            },
        }
        for _ in range(rounds):
            for mode, mode_env in modes.items():
                for name, env in configs.items():
                    run = measure("graph", requests, tmp, plan, {**mode_env, **env})[(16, None)]
                    runs.setdefault((mode, name), []).append(run)
    print(
        f"| mode | generation hop | req/s c = 16 | vs before | p50 ms | p99 ms "
        f"| generation p50 ms | errors |  (median of {rounds} interleaved rounds)"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in modes:
        before = statistics.median(r.rps for r in runs[(mode, "one batch in flight (before)")])
        for name in configs:
            group = runs[(mode, name)]
            rps = statistics.median(r.rps for r in group)
            p50 = statistics.median(r.pct(50) for r in group)
            p99 = statistics.median(r.pct(99) for r in group)
            generation = statistics.median(r.stage_p50("generation") for r in group)
            errors = sum(r.errors for r in group)
            print(
                f"| {mode} | {name} | {rps:.1f} | {100 * (rps / before - 1):+.1f}% | {p50:.0f} "
                f"| {p99:.0f} | {generation:.1f} | {errors} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--levers", action="store_true", help="the lever table instead")
    parser.add_argument(
        "--lever", action="append", choices=sorted(LEVERS), help="only these levers"
    )
    parser.add_argument(
        "--durability", action="store_true", help="buffered vs durable decision logging"
    )
    parser.add_argument(
        "--load-signal",
        action="store_true",
        help="generation's hop before and after issue 16, task mode and a 0.5 s LLM",
    )
    parser.add_argument(
        "--shadows", action="store_true", help="served p50 with and without the shadows"
    )
    parser.add_argument(
        "--before", type=Path, default=None, help="--shadows: an earlier checkout's graph too"
    )
    parser.add_argument(
        "--candidates", action="store_true", help="served p50 at K = 50 against K = 5, c = 16"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="--durability, --load-signal, --shadows, --candidates: rounds",
    )
    args = parser.parse_args()
    print(run_header(f"{args.requests} tips per level"), flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        if args.candidates:
            candidates_rounds_table(args.requests, Path(tmp_dir), args.rounds)
        elif args.shadows:
            shadows_table(args.requests, Path(tmp_dir), args.rounds, args.before)
        elif args.load_signal:
            load_signal_table(args.requests, Path(tmp_dir), args.rounds)
        elif args.durability:
            durability_table(args.requests, Path(tmp_dir), args.rounds)
        elif args.levers or args.lever:
            lever_table(args.lever or list(LEVERS), args.requests, Path(tmp_dir))
        else:
            ratio_table(args.requests, Path(tmp_dir))


if __name__ == "__main__":
    main()
