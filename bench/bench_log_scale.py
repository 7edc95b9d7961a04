"""A Postgres decision log of millions of decisions: bulk-load it, then time the hot reads,
one writer's inserts and a week's drop by retention, and print each hot query's plan.

Run with ``make bench-log-scale`` (10 million decisions over 180 days; ``DECISIONS=``
changes it).  Prints a markdown report for BENCHMARKS.md.

The rows are real: a short in-process simulation (the shipped config, two shadows) logs a
few thousand decisions to SQLite, and the loader copies them (``COPY``) over and over with
fresh event ids, users and times, spread evenly over ``--days`` and across ``--users``.
Each decision has its two shadow runs; ``--feedback`` of them a reaction and a reward.
The log is migrated and partitioned by this code (``tipgraph/store/partitions.py``)
before the load, so the load lands in week partitions as live traffic would.  A loaded
database is reused by the next run with the same size (``--reload`` to start over).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from tipgraph.settings import FeatureSettings
from tipgraph.store import (
    PolicyScoresEntry,
    PolicyScoresRecord,
    PostgresStore,
    _rows,
    packing,
    partitions,
)
from tipgraph.store.records import DecisionRecord

ROOT = Path(__file__).resolve().parents[1]
PG_DATABASE = "tipgraph_scale"
DECISION_COLUMNS = (
    "event_id, user_key, created_at, policy_name, policy_version, feature_version, "
    "prompt_version, generation_source, chosen_candidate_id, chosen_kind, "
    "chosen_probability, latency_context_ms, latency_generation_ms, latency_scoring_ms, "
    "latency_total_ms, generation_reason, llm_model, user_key_id, llm_pool, "
    "llm_pool_age_s, eligibility, n_candidates, candidates, chosen_content"
)
RUN_COLUMNS = (
    "event_id, policy_name, policy_version, role, chosen_candidate_id, chosen_probability, "
    "latency_ms, error, created_at, probabilities"
)
REACTIONS = (("done", 1.0), ("snooze", 0.0), ("dismiss", -1.0))
HISTORY_LIMIT = FeatureSettings().history_limit  # what the context stage asks for


def _templates(
    tmp: Path, decisions: int
) -> tuple[list[tuple[Any, ...]], list[list[tuple[Any, ...]]]]:
    """Decision rows and each one's shadow runs, as the simulated traffic logged them."""
    url = f"sqlite:///{tmp / 'templates.db'}"
    subprocess.run(
        [
            sys.executable, "-m", "tipgraph_ops.cli", "simulate", "--in-process",
            "--store-url", url, "--users", "50", "--decisions", str(decisions),
            "--no-progress", "--block", str(decisions),
        ],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    with closing(sqlite3.connect(tmp / "templates.db")) as conn:
        rows = conn.execute(f"SELECT {DECISION_COLUMNS} FROM decisions").fetchall()
        runs: dict[str, list[tuple[Any, ...]]] = {}
        for run in conn.execute(f"SELECT {RUN_COLUMNS} FROM policy_runs"):
            runs.setdefault(run[0], []).append(run)
    return rows, [runs.get(row[0], []) for row in rows]


def _database(admin_url: str, decisions: int, reload: bool) -> tuple[str, bool]:
    """(the scale database's URL, whether it holds a log of ``decisions`` already); a
    smaller log is started over."""
    url = admin_url.rsplit("/", 1)[0] + f"/{PG_DATABASE}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (PG_DATABASE,)
        ).fetchone()
    if exists and not reload:
        with psycopg.connect(url) as conn:
            (loaded,) = conn.execute(  # type: ignore[misc]
                "SELECT COUNT(*) FROM decisions WHERE created_at < now() - interval '1 day'"
            ).fetchone()
        if loaded >= decisions * 0.75:  # each run drops the oldest of the 26 weeks
            return url, True
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(PG_DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PG_DATABASE)))
    return url, False


def _hex_ids(rng: np.random.Generator, n: int, digits: int) -> list[str]:
    return [bytes(row).hex() for row in rng.integers(0, 256, (n, digits // 2), dtype=np.uint8)]


def load(
    url: str,
    args: argparse.Namespace,
    templates: Sequence[tuple[Any, ...]],
    runs: Sequence[Sequence[tuple[Any, ...]]],
    now: datetime,
) -> float:
    """COPY ``args.decisions`` decisions in; returns the seconds it took."""
    rng = np.random.default_rng(0)
    users = _hex_ids(rng, args.users, len(templates[0][1]))
    first = now - timedelta(days=args.days)
    step = timedelta(days=args.days) / args.decisions
    chunk = 100_000
    start = time.perf_counter()
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur:
            partitions.ensure_weeks(cur, first, now)
        conn.commit()
        for offset in range(0, args.decisions, chunk):
            n = min(chunk, args.decisions - offset)
            ids = _hex_ids(rng, n, 40)
            who = rng.integers(0, args.users, n)
            picks = rng.integers(0, len(templates), n)
            reacted = rng.random(n) < args.feedback
            reactions = rng.integers(0, len(REACTIONS), n)
            with conn.cursor() as cur:
                with cur.copy(f"COPY decisions ({DECISION_COLUMNS}) FROM STDIN") as copy:
                    for i in range(n):
                        row = templates[picks[i]]
                        at = first + step * (offset + i)
                        copy.write_row((ids[i], users[who[i]], at, *row[3:]))
                with cur.copy(f"COPY policy_runs ({RUN_COLUMNS}) FROM STDIN") as copy:
                    for i in range(n):
                        at = first + step * (offset + i) + timedelta(seconds=1)
                        for run in runs[picks[i]]:
                            copy.write_row((ids[i], *run[1:8], at, run[9]))
                with cur.copy(
                    "COPY feedback (event_id, reaction, value, reward, reacted_at, received_at, "
                    "learned, user_key, decided_at, chosen_kind, chosen_content) FROM STDIN"
                ) as copy:
                    for i in np.flatnonzero(reacted).tolist():
                        decided = first + step * (offset + i)
                        at = decided + timedelta(minutes=5)
                        reaction, reward = REACTIONS[reactions[i]]
                        row = templates[picks[i]]
                        kind, content = row[9], row[23]
                        user = users[who[i]]
                        copy.write_row(
                            (
                                ids[i],
                                reaction,
                                None,
                                reward,
                                at,
                                at,
                                True,
                                user,
                                decided,
                                kind,
                                content,
                            )
                        )
                with cur.copy(
                    "COPY rewards (event_id, reward, source, created_at) FROM STDIN"
                ) as copy:
                    for i in np.flatnonzero(reacted).tolist():
                        at = first + step * (offset + i) + timedelta(minutes=5)
                        copy.write_row((ids[i], REACTIONS[reactions[i]][1], "feedback", at))
            conn.commit()
            done = offset + n
            rate = done / (time.perf_counter() - start)
            print(f"  loaded {done:,} decisions ({rate:,.0f}/s)", file=sys.stderr, flush=True)
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - start


def _percentiles(samples: Sequence[float]) -> tuple[float, float]:
    ms = np.asarray(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def timed(call: Callable[[Any], object], arguments: Sequence[Any]) -> tuple[float, float]:
    """(p50, p99) ms of ``call`` over ``arguments``, after a pass that warms the cache."""
    for argument in arguments[: len(arguments) // 10]:
        call(argument)
    took = []
    for argument in arguments:
        begin = time.perf_counter()
        call(argument)
        took.append(time.perf_counter() - begin)
    return _percentiles(took)


def records(
    templates: Sequence[tuple[Any, ...]], runs: Sequence[Sequence[tuple[Any, ...]]]
) -> list[tuple[DecisionRecord, list[PolicyScoresRecord]]]:
    """The template rows as the records the decision log's writer hands the store."""
    made = []
    for row, shadows in zip(templates, runs, strict=True):
        (event_id, user_key, created_at, policy_name, policy_version, feature_version,
         prompt_version, source, chosen_id, chosen_kind, chosen_probability, *latency,
         reason, model, key_id, pool, pool_age, eligibility, _, packed, content) = row  # fmt: skip
        unpacked = packing.unpack_candidates(packed)
        probabilities = unpacked.probabilities.tolist()
        served = PolicyScoresRecord(
            policy_name, policy_version, "served", probabilities, probabilities,
            chosen_id, chosen_probability, latency[2] or 0.0,
        )  # fmt: skip
        decision = DecisionRecord(
            event_id=event_id,
            user_key=user_key,
            created_at=datetime.fromisoformat(created_at),
            policy_name=policy_name,
            policy_version=policy_version,
            feature_version=feature_version,
            prompt_version=prompt_version,
            generation_source=source,
            chosen_candidate_id=chosen_id,
            chosen_kind=chosen_kind,
            chosen_probability=chosen_probability,
            latency_ms={
                stage: value
                for stage, value in zip(_rows.LATENCY_STAGES, latency, strict=True)
                if value is not None
            },
            candidates=_rows.candidate_records(packed, chosen_id, content),
            served=served,
            generation_reason=reason,
            llm_model=model,
            user_key_id=key_id,
            llm_pool=pool,
            llm_pool_age_s=pool_age,
            ineligible=json.loads(eligibility) if eligibility else {},
        )
        shadow_records = []
        for run in shadows:
            p = packing.unpack_floats(run[9]) if run[9] is not None else []
            shadow_records.append(
                PolicyScoresRecord(run[1], run[2], "shadow", p, p, run[4], run[5], run[6], run[7])
            )
        made.append((decision, shadow_records))
    return made


def insert_rate(
    store: PostgresStore,
    made: Sequence[tuple[DecisionRecord, list[PolicyScoresRecord]]],
    users: Sequence[str],
    n: int,
    batch: int,
) -> float:
    """Decisions per second one writer inserts through ``DecisionStore.write_batch``,
    ``batch`` decisions with their shadow runs per transaction (what the decision log's
    writer does per flush), into today's partition."""
    rng = np.random.default_rng()
    ids = _hex_ids(rng, n, 40)
    start = time.perf_counter()
    for offset in range(0, n, batch):
        decisions, shadows = [], []
        for i in range(offset, min(offset + batch, n)):
            decision, runs = made[i % len(made)]
            decision = replace(
                decision,
                event_id=ids[i],
                user_key=users[i % len(users)],
                created_at=datetime.now(UTC),
            )
            decisions.append(decision)
            ids_of = [c.candidate_id for c in decision.candidates]
            shadows.append(PolicyScoresEntry(ids[i], runs, ids_of))
        store.write_batch(decisions, shadows)
    return n / (time.perf_counter() - start)


PLANS = {
    "history (GET /v1/tips: the user's reactions)": (
        "select_user_history",
        ("{user}", HISTORY_LIMIT),
    ),
    "exposures (eligibility, recency)": (
        "select_exposures",
        ("{user}", "{week_ago}", 200),
    ),
    "a decision by event id (POST /v1/feedback)": ("select_decision_for_feedback", ("{event}",)),
    "one day of learned decisions (tune, report)": ("select_logged", ("{day_ago}", "{now}")),
    "the oldest expired decisions (retention's row path)": (
        "select_expired_decisions",
        ("{cutoff}", 1000),
    ),
}


def plans(store: PostgresStore, url: str, values: dict[str, Any]) -> dict[str, str]:
    """EXPLAIN (ANALYZE) of each hot statement, exactly as the store runs it."""
    found = {}
    with psycopg.connect(url) as conn:
        for title, (name, params) in PLANS.items():
            statement = getattr(store._sql, name)
            bound = [values[p[1:-1]] if isinstance(p, str) else p for p in params]
            rows = conn.execute("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + statement, bound)
            found[title] = "\n".join(row[0] for row in rows)
    return found


# The baseline code reads this code's schema as it is (the tables it reads are unchanged);
# its own check would refuse a schema newer than its migrations.
_AS_IS = """
import tipgraph.store.postgres
tipgraph.store.postgres.open_schema = lambda *args, **kwargs: None
"""

_LOAD = (
    _AS_IS
    + """
import json, resource, sys, time
from datetime import datetime
from tipgraph.features import FEATURE_SPEC
from tipgraph.store import LogFilter, PostgresStore
from tuning.data import load_training_log
store = PostgresStore(sys.argv[1], migrate=False)
store.open()
start = time.perf_counter()
log = load_training_log(
    store,
    feature_version=FEATURE_SPEC.version,
    log_filter=LogFilter(since=datetime.fromisoformat(sys.argv[2])),
).log
took = time.perf_counter() - start
print(json.dumps({
    "seconds": took, "events": log.n_events, "arrays": log.X.nbytes + log.pscore.nbytes,
    "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""
)

_EXPORT = (
    _AS_IS
    + """
import json, os, resource, sys, time
from tipgraph_ops.cli import main
os.environ["TIPGRAPH_STORE__URL"] = sys.argv[1]
start = time.perf_counter()
code = main(["export", "--since", sys.argv[2], "--out", sys.argv[3], "--no-progress"])
assert code == 0, code
print(json.dumps({
    "seconds": time.perf_counter() - start, "bytes": os.path.getsize(sys.argv[3]),
    "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
}))
"""
)


def _child(script: str, *argv: str, code: Path = ROOT) -> dict[str, Any]:
    """``script`` in a process of its own (its peak memory is its own), in ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=code, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def since_for(url: str, events: int) -> datetime:
    """The time from which the log holds about ``events`` learned decisions."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT d.created_at FROM decisions AS d JOIN rewards AS r ON r.event_id = d.event_id "
            "ORDER BY d.created_at DESC OFFSET %s LIMIT 1",
            (events - 1,),
        ).fetchone()
    assert row is not None, f"the log holds fewer than {events} learned decisions"
    return row[0]


def offline_figures(
    url: str, args: argparse.Namespace
) -> list[tuple[str, str, int, dict[str, Any]]]:
    """`tipgraph tune`'s load of the log and `tipgraph export` (Parquet), each in a process
    of its own: this code, and ``--baseline`` in a git worktree at the sizes it can hold."""
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--quiet", str(baseline), args.baseline],
            cwd=ROOT, check=True,
        )  # fmt: skip
        try:
            for label, code, tune, export in (
                (args.baseline, baseline, args.baseline_tune_events, args.baseline_export_events),
                ("this", ROOT, args.tune_events, args.export_events),
            ):
                for events in tune:
                    since = since_for(url, events).isoformat()
                    found.append(("tune load", label, events, _child(_LOAD, url, since, code=code)))
                for events in export:
                    since = since_for(url, events).isoformat()
                    out = str(Path(tmp) / f"export-{events}.parquet")
                    figures = _child(_EXPORT, url, since, out, code=code)
                    found.append(("export (Parquet)", label, events, figures))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(baseline)], cwd=ROOT, check=False
            )
    return found


def size(url: str) -> int:
    with psycopg.connect(url) as conn:
        (total,) = conn.execute("SELECT pg_database_size(current_database())").fetchone()  # type: ignore[misc]
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--decisions", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--feedback", type=float, default=0.3, help="share with a reaction")
    parser.add_argument("--templates", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--inserts", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500, help="decisions per write")
    parser.add_argument("--reload", action="store_true")
    parser.add_argument(
        "--baseline", default="ba0fa70", help="commit whose tune load and export to compare"
    )
    parser.add_argument("--tune-events", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--baseline-tune-events", type=int, nargs="*", default=[100_000])
    parser.add_argument("--export-events", type=int, nargs="*", default=[20_000, 50_000, 200_000])
    parser.add_argument("--baseline-export-events", type=int, nargs="*", default=[20_000, 50_000])
    args = parser.parse_args()

    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        templates, runs = _templates(Path(tmp), args.templates)
    url, loaded = _database(args.postgres, args.decisions, args.reload)
    store = PostgresStore(url, max_size=2)
    start = time.perf_counter()
    store.open()  # migrates; partitions this week and the next ones
    open_s = time.perf_counter() - start
    if loaded:
        load_s = float("nan")
        print("reusing the loaded log", file=sys.stderr)
    else:
        load_s = load(url, args, templates, runs, now)
    with psycopg.connect(url) as conn:
        sample = conn.execute(
            "SELECT user_key, event_id FROM decisions TABLESAMPLE SYSTEM (1) LIMIT %s",
            (args.samples,),
        ).fetchall()
    users_sampled = [row[0] for row in sample]
    events_sampled = [row[1] for row in sample]
    week_ago = now - timedelta(days=7)
    history = timed(lambda u: store.user_history(u, HISTORY_LIMIT), users_sampled)
    exposures = timed(lambda u: store.recent_exposures(u, week_ago, 200), users_sampled)
    lookups = timed(store.get_decision, events_sampled)
    made = records(templates, runs)
    rates = [insert_rate(store, made, users_sampled, args.inserts, args.batch) for _ in range(3)]
    values = {
        "user": users_sampled[0],
        "event": events_sampled[0],
        "week_ago": week_ago,
        "day_ago": now - timedelta(days=1),
        "now": now,
        "cutoff": now - timedelta(days=args.days - 7),
    }
    explained = plans(store, url, values)
    total = size(url)
    decisions = store.counts().decisions

    with psycopg.connect(url) as conn, conn.cursor() as cur:
        oldest = partitions.existing_weeks(cur)[0]
    start = time.perf_counter()
    dropped = store.drop_expired_partitions(oldest.end)
    drop_s = time.perf_counter() - start
    store.close()

    print(f"## Decision log at scale (issue 21, goal 6) — {now:%Y-%m-%d}, {platform.machine()}\n")
    print(f"{decisions:,} decisions over {args.days} days, {args.users:,} users, "
          f"{args.feedback:.0%} with feedback; {total / 1e9:.1f} GB in all "
          f"({total / decisions:,.0f} B per decision with indexes).\n")  # fmt: skip
    print("| figure | value | goal |\n| --- | ---: | --- |")
    if load_s == load_s:
        print(f"| bulk load (COPY) | {decisions / load_s:,.0f} decisions/s | — |")
    print(f"| opening the store (with any pending migration) | {open_s:.1f} s | — |")
    print(f"| history read, p50 / p99 | {history[0]:.2f} / {history[1]:.2f} ms | p99 ≤ 5 ms |")
    print(f"| exposures read, p50 / p99 | {exposures[0]:.2f} / {exposures[1]:.2f} ms | — |")
    print(f"| decision by event id, p50 / p99 | {lookups[0]:.2f} / {lookups[1]:.2f} ms | — |")
    print(f"| one writer's inserts (batches of {args.batch}, 2 shadows), median of 3 | "
          f"{statistics.median(rates):,.0f} decisions/s | ≥ 5,000 |")  # fmt: skip
    offline = offline_figures(url, args)
    dropped_n = dropped.decisions
    print(f"| retention drops the oldest week | {drop_s:.1f} s ({dropped_n:,} decisions) | — |")
    print()
    print("| offline read | code | events | seconds | events/s | peak RSS | arrays or file |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for what, code, events, figures in offline:
        took = figures["seconds"]
        other = figures.get("arrays", figures.get("bytes", 0))
        print(
            f"| {what} | {code} | {events:,} | {took:.1f} | {events / took:,.0f} | "
            f"{figures['peak'] / 2**30:.2f} GiB | {other / 2**30:.2f} GiB |"
        )
    print()
    for title, plan in explained.items():
        print(f"**{title}**\n\n```\n{plan}\n```\n")


if __name__ == "__main__":
    main()
