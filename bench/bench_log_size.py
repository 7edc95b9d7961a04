"""Decision-log bytes per decision, this code against a baseline commit, in one run.

Run with ``make bench-log-size``.  Prints a markdown report for BENCHMARKS.md.

Each code (this checkout, and ``--baseline`` checked out in a throw-away git worktree) logs
the same simulated traffic (``tipgraph simulate --in-process``: the shipped config, two
shadows, every decision answered) to a fresh SQLite file and a fresh Postgres database, in
task mode (the embedded default) and in mixed mode (LLM tips from the pool, simulated
models).  What a decision costs is every byte of the decision log's tables and their
indexes (SQLite: ``dbstat`` pages; Postgres: ``pg_total_relation_size``) over the number
of decisions.  The candidate pool and the embedding cache are caches, not the log, and are
left out.  Each log is then read back as tuning and the report read it
(``DecisionStore.logged_events``, median of 3, in the code that wrote it), and the
baseline's logs are migrated to this code's layout (migration 0009, timed).  Last, the
compact codec's cost per decision: packing (the writer) and unpacking (every reader).
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

from tipgraph.store import packing

ROOT = Path(__file__).resolve().parents[1]
LOG_TABLES = ("decisions", "candidates", "policy_runs", "tip_scores", "feedback", "rewards")
PG_DATABASE = "tipgraph_logsize"


def _simulate(code: Path, url: str, decisions: int, users: int, mixed: bool) -> None:
    command = [
        sys.executable, "-m", "tipgraph_ops.cli", "simulate", "--in-process",
        "--store-url", url, "--users", str(users), "--decisions", str(decisions),
        "--no-progress", "--block", str(decisions),
    ]  # fmt: skip
    if mixed:
        command.append("--simulated-llm")
    # The code under test first on the path, ahead of this checkout's editable install.
    env = {**os.environ, "PYTHONPATH": str(code), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    subprocess.run(command, cwd=code, env=env, check=True, capture_output=True)


def _sqlite_sizes(path: Path) -> tuple[int, dict[str, int]]:
    with closing(sqlite3.connect(path)) as conn:
        owner = dict(conn.execute("SELECT name, tbl_name FROM sqlite_master"))
        sizes: dict[str, int] = {}
        for name, size in conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"):
            table = owner.get(name, name)
            if table in LOG_TABLES:
                sizes[table] = sizes.get(table, 0) + int(size)
        (n,) = conn.execute("SELECT COUNT(*) FROM decisions").fetchone()
    return int(n), sizes


def _postgres_sizes(url: str) -> tuple[int, dict[str, int]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class AS c "
            "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r'"
        ).fetchall()
        (n,) = conn.execute("SELECT COUNT(*) FROM decisions").fetchone()  # type: ignore[misc]
    return int(n), {name: int(size) for name, size in rows if name in LOG_TABLES}


def _fresh_postgres(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(PG_DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_DATABASE)))
    return admin_url.rsplit("/", 1)[0] + f"/{PG_DATABASE}"


_READ = """
import statistics, sys, time
from tipgraph.settings import StoreSettings
from tipgraph.store import open_store
with open_store(StoreSettings(url=sys.argv[1])) as store:
    took = []
    for _ in range(3):
        start = time.perf_counter()
        n = len(store.logged_events())
        took.append(time.perf_counter() - start)
print(n / statistics.median(took))
"""


def _read_rate(code: Path, url: str) -> float:
    """Learned decisions per second that ``logged_events`` reads, in ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(
        [sys.executable, "-c", _READ, url], cwd=code, env=env, check=True, capture_output=True
    )
    return float(done.stdout)


def _migrate_seconds(url: str) -> float:
    """How long this code's migrations take on the log at ``url`` (opening migrates)."""
    from tipgraph.settings import StoreSettings
    from tipgraph.store import open_store

    start = time.perf_counter()
    open_store(StoreSettings(url=url)).close()
    return time.perf_counter() - start


def measure(
    code: Path, backend: str, mixed: bool, args: argparse.Namespace, tmp: Path
) -> tuple[int, dict[str, int], float, str]:
    """(decisions, bytes by table, decisions read per second, the log's URL)."""
    if backend == "sqlite":
        path = tmp / f"log-{time.monotonic_ns()}.db"
        url = f"sqlite:///{path}"
        _simulate(code, url, args.decisions, args.users, mixed)
        return (*_sqlite_sizes(path), _read_rate(code, url), url)
    url = _fresh_postgres(args.postgres)
    _simulate(code, url, args.decisions, args.users, mixed)
    return (*_postgres_sizes(url), _read_rate(code, url), url)


def codec_cost(rounds: int = 5) -> tuple[float, float, int]:
    """(pack µs, unpack µs, packed bytes) for a decision of 7 candidates of the shipped
    layout (81 features: the context in one kind's columns of six, 21 of the candidate's),
    medians of ``rounds``."""
    from tipgraph.features import FEATURE_SPEC

    rng = np.random.default_rng(0)
    n_ctx, n_kinds = 10, 6
    X = np.zeros((7, FEATURE_SPEC.dim))
    context = rng.uniform(size=n_ctx)
    for row in range(7):
        X[row, row % n_kinds : n_ctx * n_kinds : n_kinds] = context
        X[row, n_ctx * n_kinds :] = rng.uniform(size=FEATURE_SPEC.dim - n_ctx * n_kinds)
    texts = [
        packing.CandidateTexts(f"focus-{i:012x}", "focus", "tasks", "", "ab" * 16, None, None)
        for i in range(7)
    ]
    features, probabilities = X.tolist(), (np.ones(7) / 7).tolist()
    packs, unpacks = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(1000):
            packed = packing.pack_candidates(texts, features, probabilities)
        packs.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        for _ in range(1000):
            packing.unpack_candidates(packed).features.tolist()
        unpacks.append((time.perf_counter() - start) * 1000)
    return float(np.median(packs)), float(np.median(unpacks)), len(packed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--baseline", default="85b2cf5", help="commit of the baseline code")
    parser.add_argument(
        "--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="a database of a server where this role may create databases",
    )  # fmt: skip
    args = parser.parse_args()
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(f"## Decision log size — {time.strftime('%Y-%m-%d')}, {platform.machine()}")
    print(
        f"\n{args.decisions} decisions of {args.users} users per cell, this code ({head}) "
        f"against {args.baseline}:\n"
    )
    print(
        "| backend | mode | code | bytes/decision | by table (bytes/decision) "
        "| logged_events, decisions/s |"
    )
    print("| --- | --- | --- | ---: | --- | ---: |")
    migrations = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        baseline = tmp / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(baseline), args.baseline],
            cwd=ROOT,
            check=True,
        )
        try:
            for backend in ("sqlite", "postgres"):
                for mixed in (False, True):
                    mode = "mixed (LLM pool)" if mixed else "tasks"
                    for label, code in ((args.baseline, baseline), ("this", ROOT)):
                        n, sizes, rate, url = measure(code, backend, mixed, args, tmp)
                        parts = ", ".join(
                            f"{t} {s / n:,.0f}"
                            for t, s in sorted(sizes.items(), key=lambda kv: -kv[1])
                        )
                        total = sum(sizes.values()) / n
                        print(
                            f"| {backend} | {mode} | {label} | {total:,.0f} | {parts} "
                            f"| {rate:,.0f} |"
                        )
                        if label == args.baseline:
                            migrations.append((backend, mode, n, _migrate_seconds(url)))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False
            )
    print("\nMigrating the baseline's logs to this layout (0009, one transaction):\n")
    for backend, mode, n, seconds in migrations:
        print(f"* {backend}, {mode}: {n} decisions in {seconds:.2f} s")
    pack_us, unpack_us, size = codec_cost()
    print(
        f"\nCodec, 7 candidates x 81 features: pack {pack_us:.1f} µs, unpack {unpack_us:.1f} µs "
        f"per decision ({size} bytes; medians of 5 x 1000)."
    )


if __name__ == "__main__":
    main()
