"""LLM tips off the hot path (issue 17): the Serve graph in mixed mode, serving from the
candidate pool, against the Ollama stub with a slow model (generation 3 s, judge 1 s,
embeddings 50 ms), and the same graph in task mode, in one run.

Simulated users come back (``tipgraph.simulator``: 600 users, each visit keeps the
user's task list with probability 1 - churn, and a user comes back at least 5 s after
their last visit, longer than a refill takes).  After warm-up visits (every user, until
their pool entries are filled), each mode is driven at concurrency 1 and 16; the table
gives the share of decisions that include LLM candidates, served p50/p99 (client-side,
over HTTP), and the model's generation calls per decision (the stub counts them).

The two modes alternate, ``--rounds`` times (3), each on a fresh ``tipgraph serve``; the
table gives the medians over rounds.  The stub runs in its own process at the lowest CPU
priority (``nice -n 19``): it stands for a model server on other hardware, and its CPU
here is the rig's, not the graph's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.bench_graph import TOKEN, free_port, run_header, start, wait_ready
from tipgraph.simulator import SimRequest, SimUser, make_request, make_users, revisit

ROOT = Path(__file__).resolve().parents[1]
LATENCY_S = {"chat": 3.0, "judge": 1.0, "embed": 0.05}
WARM_UP_ROUNDS = 4


@dataclass(frozen=True)
class Result:
    round: int
    mode: str
    concurrency: int
    churn: float
    latencies: list[float]
    with_llm: int
    generations: int

    def pct(self, p: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[p - 1] * 1000


class StubProcess:
    """The Ollama stub in a process of its own, at the lowest CPU priority."""

    def __init__(self) -> None:
        latency = [f"--{name}-latency-s={value}" for name, value in LATENCY_S.items()]
        command = ["nice", "-n", "19", sys.executable, "-m", "tests.ollama_stub", *latency]
        self._process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        self.url = self._process.stdout.readline().strip()
        if not self.url.startswith("http"):
            self.close()
            raise RuntimeError("the Ollama stub did not start")

    def counts(self) -> dict[str, int]:
        """Calls answered so far: chat (generations), judge, embed."""
        counts: dict[str, int] = httpx.get(f"{self.url}/stub/counts", timeout=10).json()
        return counts

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(30)

    def __enter__(self) -> StubProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Users:
    """Simulated users who come back: a visit is from a user whose last visit was at least
    ``gap_s`` ago (real users come back after minutes or hours; the gap only has to be
    longer than a refill), and keeps the user's task list with probability ``1 - churn``."""

    def __init__(self, users: int, churn: float, gap_s: float, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._population = make_users(users, self._rng)
        self.churn = churn
        self._gap_s = gap_s
        self._last: dict[str, SimRequest] = {}
        self._seen_at: dict[str, float] = {}
        self._visits = 0

    def every_user(self) -> list[dict[str, Any]]:
        """One visit from every user (the warm-up)."""
        return [self._visit(user) for user in self._population]

    async def next_visit(self) -> dict[str, Any]:
        while True:
            now = time.monotonic()
            ready = [
                u
                for u in self._population
                if now - self._seen_at.get(u.user_id, -1e9) >= self._gap_s
            ]
            if ready:
                return self._visit(ready[int(self._rng.integers(len(ready)))])
            await asyncio.sleep(0.02)

    def _visit(self, user: SimUser) -> dict[str, Any]:
        previous = self._last.get(user.user_id)
        if previous is None or self._rng.random() < self.churn:
            request = make_request(user, self._visits, self._rng)
        else:
            request = revisit(previous, self._visits, self._rng)
        self._last[user.user_id] = request
        self._seen_at[user.user_id] = time.monotonic()
        self._visits += 1
        return request.body


async def drive(
    url: str, visits: Callable[[], Awaitable[dict[str, Any]]], count: int, concurrency: int
) -> tuple[list[float], int]:
    latencies: list[float] = []
    with_llm = 0
    remaining = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal with_llm
        for _ in remaining:
            body = await visits()
            start_s = time.perf_counter()
            response = await client.post("/v1/tips", json=body)
            latencies.append(time.perf_counter() - start_s)
            response.raise_for_status()
            with_llm += any("-llm" in r["candidate_id"] for r in response.json()["ranking"])

    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=120
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return latencies, with_llm


def wait_for_refills(stub: StubProcess, at_least: int, timeout_s: float = 300) -> None:
    """Until the stub has answered ``at_least`` generations and then a whole refill's time
    (generation, judge) passed without a new call: nothing is in flight.  (The pool
    replica may still be starting: Serve routes requests once the ingress is up, and the
    refills wait at the handle.)"""
    deadline = time.monotonic() + timeout_s
    quiet_s = LATENCY_S["chat"] + LATENCY_S["judge"] + 1
    while time.monotonic() < deadline:
        before = stub.counts()
        time.sleep(quiet_s)
        after = stub.counts()
        if after == before and after["chat"] >= at_least:
            return
    raise RuntimeError("refills did not settle")


def run_mode(
    round_: int, mode: str, stub: StubProcess, tmp: Path, args: argparse.Namespace
) -> list[Result]:
    env = {
        "OLLAMA_API_BASE": stub.url,
        "TIPGRAPH_GENERATION__SOURCE": mode,
        "TIPGRAPH_GENERATION__POOL__WORKERS": str(args.workers),
    }
    port = free_port()
    process = start("graph", port, tmp, env)
    url = f"http://127.0.0.1:{port}"
    users = Users(args.users, args.churn, args.gap_s, args.seed)
    try:
        wait_ready(url)
        # Warm-up: a visit from every user, then the refills those visits queued, again
        # until a round queues none: a burst of new users beyond pool.queue_size gets task
        # tips and is queued at its next visit (backpressure, by design).
        for warm_up in range(WARM_UP_ROUNDS):
            before = stub.counts()["chat"]
            visits = iter(users.every_user())

            async def visit(visits: Iterator[dict[str, Any]] = visits) -> dict[str, Any]:
                return next(visits)

            asyncio.run(drive(url, visit, args.users, 16))
            if mode == "tasks":
                break
            wait_for_refills(stub, at_least=before + 1 if warm_up == 0 else before)
            if stub.counts()["chat"] == before:
                break
        results = []
        # Last, c = 16 with no task list changing: what refills running beside the
        # requests (one per changed task list) cost on this 2-core machine.
        for concurrency, churn in ((1, args.churn), (16, args.churn), (16, 0.0)):
            users.churn = churn
            before = stub.counts()["chat"]
            latencies, with_llm = asyncio.run(
                drive(url, users.next_visit, args.requests, concurrency)
            )
            generations = stub.counts()["chat"] - before
            result = Result(round_, mode, concurrency, churn, latencies, with_llm, generations)
            results.append(result)
            print(
                f"  {mode} c={concurrency} churn={churn}: p50 {result.pct(50):.1f} ms, "
                f"p99 {result.pct(99):.1f} ms, with LLM {with_llm}/{len(latencies)}, "
                f"generations {generations}",
                flush=True,
            )
        return results
    finally:
        process.terminate()
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="per concurrency level")
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--churn", type=float, default=0.05, help="a visit's chance of new tasks")
    parser.add_argument(
        "--gap-s", type=float, default=5.0, help="least time between two visits of one user"
    )
    parser.add_argument(
        "--workers", type=int, default=32, help="generation.pool.workers (refills at once)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="task and mixed runs, alternating")
    args = parser.parse_args()
    details = (
        f"{args.requests} tips per level, {args.users} users, churn {args.churn}, "
        f"gap {args.gap_s} s, pool.workers {args.workers}, stub latency {LATENCY_S}, "
        f"{args.rounds} rounds"
    )
    print(run_header(details), flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp_dir, StubProcess() as stub:
        for round_ in range(args.rounds):
            for mode in ("tasks", "mixed"):
                run_dir = Path(tmp_dir) / f"{mode}-{round_}"
                run_dir.mkdir()
                results += run_mode(round_, mode, stub, run_dir, args)
                print(f"round {round_ + 1}/{args.rounds}: {mode} done", flush=True)
    print_table(results)


def print_table(results: list[Result]) -> None:
    """Medians over rounds of p50 and p99; the p99 of every round; shares over all rounds."""
    levels = sorted({(r.concurrency, -r.churn) for r in results})
    print(
        "| mode | c | churn | decisions | with LLM candidates | p50 ms | p99 ms "
        "| p99 ms per round | p99 vs task mode | generation calls / decision |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for mode in ("tasks", "mixed"):
        for concurrency, negative_churn in levels:
            churn = -negative_churn
            runs = [
                r for r in results if (r.mode, r.concurrency, r.churn) == (mode, concurrency, churn)
            ]
            tasks = [
                r
                for r in results
                if (r.mode, r.concurrency, r.churn) == ("tasks", concurrency, churn)
            ]
            p99 = statistics.median(r.pct(99) for r in runs)
            vs = 100 * (p99 / statistics.median(r.pct(99) for r in tasks) - 1)
            n = sum(len(r.latencies) for r in runs)
            with_llm = sum(r.with_llm for r in runs)
            generations = sum(r.generations for r in runs)
            per_round = ", ".join(f"{r.pct(99):.0f}" for r in runs)
            print(
                f"| {mode} | {concurrency} | {churn} | {n} | {100 * with_llm / n:.1f}% "
                f"| {statistics.median(r.pct(50) for r in runs):.1f} | {p99:.1f} "
                f"| {per_round} | {vs:+.1f}% | {generations / n:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
