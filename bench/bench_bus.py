"""Reactions from NATS JetStream through the real Serve graph: how fast one reactions
replica applies them, and how long the lag takes to return to zero after an outage.

Run with ``make bench-bus``.  One local Ray cluster; the graph as configured
(``configs/tipgraph.yaml``, its shadows included) on the local Postgres, with the
reactions deployment pinned to one replica; the local NATS server.

* **Throughput** (``--rounds`` rounds): ``--reactions`` decisions are served over HTTP and
  stored, then one reaction each is published at once (``publish_async``: the publisher is
  not the bound); the figure is reactions / (first publish -> the consumer's lag is zero).
* **Outage** (``--outages`` rounds): decisions served, then the application is deleted (tipgraph
  down), reactions are published at ``--rate`` per second for ``--outage-s`` seconds, and the
  application is deployed again.  The figures: the lag it finds, the time until the graph
  is up (``serve.run`` returns), and until the lag is zero.

The lag is read from JetStream (the durable consumer's pending + unacked), not from tipgraph.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import nats
import psycopg
from nats.js import JetStreamContext

from bench.bench_graph import USER_KEY_SECRET, free_port
from tests.factories import tip_body
from tipgraph.reactions import encode_reaction, ensure_streams
from tipgraph.settings import BusSettings, TipgraphSettings, load_settings

TOKEN = "bench-token"
PG_URL = os.environ.get("TIPGRAPH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("TIPGRAPH_TEST_NATS_URL", "nats://127.0.0.1:4222")
APP = "busbench"


def _settings(port: int, schema: str, bus: BusSettings, spill: str) -> TipgraphSettings:
    base = load_settings("configs/tipgraph.yaml")
    return TipgraphSettings(
        **{
            **base.model_dump(exclude={"store", "serve", "bus"}),
            "serve": {"app_name": APP, "route_prefix": f"/{APP}", "port": port},
            "store": {"url": PG_URL, "pg_schema": schema, "spill_dir": spill},
            "bus": bus.model_dump(),
        }
    )


def _serve_tips(url: str, n: int, tag: str) -> list[str]:
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def one(i: int) -> str:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            answer = client.post("/v1/tips", json=tip_body(user_id=f"{tag}-{i % 500}"))
            answer.raise_for_status()
            event_id: str = answer.json()["event_id"]
            return event_id

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def _count(schema: str, sql: str) -> int:
    with psycopg.connect(PG_URL, options=f"-c search_path={schema}") as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def _wait_stored(schema: str, decisions: int) -> None:
    while _count(schema, "SELECT COUNT(*) FROM decisions") < decisions:
        time.sleep(0.2)


async def _lag(js: JetStreamContext, bus: BusSettings) -> int:
    info = await js.consumer_info(bus.stream, bus.durable)
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def _until_drained(js: JetStreamContext, bus: BusSettings, since: float) -> float:
    while await _lag(js, bus) > 0:
        await asyncio.sleep(0.05)
    return time.perf_counter() - since


async def _throughput(js: JetStreamContext, bus: BusSettings, ids: list[str]) -> float:
    start = time.perf_counter()
    for event_id in ids:
        await js.publish_async(bus.subject, encode_reaction(event_id, "done"))
    await js.publish_async_completed()
    return len(ids) / await _until_drained(js, bus, start)


async def _publish_at_rate(
    js: JetStreamContext, bus: BusSettings, ids: list[str], seconds: float
) -> None:
    start = time.perf_counter()
    for i, event_id in enumerate(ids):
        due = start + i * seconds / len(ids)
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        await js.publish(bus.subject, encode_reaction(event_id, "snooze"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reactions", type=int, default=1500, help="per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--outages", type=int, default=3)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=20.0, help="reactions/s during the outage")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["TIPGRAPH_API_TOKEN"] = TOKEN
    os.environ["TIPGRAPH_PRIVACY__USER_KEY_SECRET"] = USER_KEY_SECRET
    import ray
    from ray import serve

    from graphs.tipgraph import build_graph

    suffix = uuid.uuid4().hex[:8]
    one_replica = {"autoscaling": {"signal": "lag", "min_replicas": 1, "max_replicas": 1}}
    bus = BusSettings.model_validate(
        {
            "url": NATS_URL,
            "reactions": True,
            "stream": f"BENCH_REACTIONS_{suffix}",
            "subject": f"bench.{suffix}.reactions",
            "durable": f"bench-{suffix}",
            "dead_letter_stream": f"BENCH_DEAD_{suffix}",
            "dead_letter_subject": f"bench.{suffix}.dead",
            "deployment": one_replica,
        }
    )
    schema = f"bench_bus_{suffix}"
    port = free_port()
    url = f"http://127.0.0.1:{port}/{APP}"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    async def run(settings: TipgraphSettings) -> tuple[list[float], list[tuple[int, float, float]]]:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        await ensure_streams(js, bus)
        served = 0
        rates = []
        for r in range(args.rounds):
            ids = _serve_tips(url, args.reactions, f"t{r}")
            served += len(ids)
            _wait_stored(schema, served)
            rates.append(await _throughput(js, bus, ids))
            print(f"throughput round {r + 1}: {rates[-1]:.0f} reactions/s", flush=True)
        outages = []
        for r in range(args.outages):
            ids = _serve_tips(url, int(args.rate * args.outage_s), f"o{r}")
            served += len(ids)
            _wait_stored(schema, served)
            serve.delete(APP)
            await _publish_at_rate(js, bus, ids, args.outage_s)
            waiting = await _lag(js, bus)
            start = time.perf_counter()
            serve.run(build_graph(settings), name=APP, route_prefix=f"/{APP}")
            up = time.perf_counter() - start
            drained = await _until_drained(js, bus, start)
            outages.append((waiting, up, drained))
            print(
                f"outage round {r + 1}: lag {waiting}, graph up after {up:.1f} s, "
                f"lag zero after {drained:.1f} s",
                flush=True,
            )
        for stream in (bus.stream, bus.dead_letter_stream):
            await js.delete_stream(stream)
        await nc.close()
        return rates, outages

    with tempfile.TemporaryDirectory() as spill:
        settings = _settings(port, schema, bus, spill)
        serve.run(build_graph(settings), name=APP, route_prefix=f"/{APP}")
        try:
            rates, outages = asyncio.run(run(settings))
            feedback = _count(schema, "SELECT COUNT(*) FROM feedback")
        finally:
            serve.shutdown()
            ray.shutdown()
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    expected = args.rounds * args.reactions + args.outages * int(args.rate * args.outage_s)
    print()
    print(f"| one bus replica, Postgres, {args.reactions} reactions a round | median | rounds |")
    print("| --- | ---: | --- |")
    print(
        f"| applied per second | {statistics.median(rates):.0f} | "
        f"{', '.join(f'{r:.0f}' for r in rates)} |"
    )
    if outages:
        print(
            f"| lag after a {args.outage_s:.0f} s outage at {args.rate:g}/s | "
            f"{statistics.median(o[0] for o in outages):.0f} | "
            f"{', '.join(str(o[0]) for o in outages)} |"
        )
        print(
            f"| graph up after (s) | {statistics.median(o[1] for o in outages):.1f} | "
            f"{', '.join(f'{o[1]:.1f}' for o in outages)} |"
        )
        print(
            f"| lag zero after restart (s) | {statistics.median(o[2] for o in outages):.1f} | "
            f"{', '.join(f'{o[2]:.1f}' for o in outages)} |"
        )
    verdict = "all" if feedback == expected else "LOST SOME"
    print(f"feedback rows {feedback} of {expected} published: {verdict}")


if __name__ == "__main__":
    main()
