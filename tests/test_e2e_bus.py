"""End to end: reactions from the real NATS JetStream into the real Serve graph (the
``bus`` deployment), on the real Postgres decision log, while tipgraph serves tips and HTTP
feedback over real HTTP; the bus replica is killed mid-stream.  Decision events go the
other way, from the same replica."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nats
import psycopg
import pytest

from graphs.tipgraph import PROJECT_ROOT, build_graph
from tests.conftest import AUTH_HEADERS, delete_streams, drop_schemas, test_bus_settings
from tests.factories import tip_body
from tests.test_e2e import _wait_for
from tests.test_e2e_durability import _replica_pids
from tipgraph.reactions import MSG_ID_HEADER, REASON_HEADER, encode_reaction, ensure_streams
from tipgraph.settings import BUS_DEPLOYMENT, BusSettings, TipgraphSettings, load_settings

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.nats]

APP = "bus"
DECISIONS = 900
DUPLICATES = 100
HTTP_SAME = 50  # HTTP feedback first, then the same reaction on the bus: duplicates
HTTP_OTHER = 10  # HTTP feedback first, then another reaction on the bus: conflicts


class BusApp:
    def __init__(self, port: int, settings: TipgraphSettings, postgres_url: str) -> None:
        self.settings = settings
        self.bus = settings.bus
        self.postgres_url = postgres_url
        self.url = f"http://127.0.0.1:{port}/{APP}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers=AUTH_HEADERS)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        schema = self.settings.store.pg_schema
        with psycopg.connect(self.postgres_url, options=f"-c search_path={schema}") as conn:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]

    def readyz_bus(self) -> dict[str, Any]:
        with self.client() as client:
            bus: dict[str, Any] = client.get("/readyz").json()["bus"]
        return bus


@pytest.fixture(scope="module")
def bus_app(
    serve_port: int, postgres_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BusApp]:
    from ray import serve

    tmp: Path = tmp_path_factory.mktemp("bus")
    bus = test_bus_settings(nats_url)
    events = {**bus.decision_events.model_dump(), "enabled": True}
    bus = bus.model_copy(update={"decision_events": type(bus.decision_events)(**events)})
    base = load_settings(PROJECT_ROOT / "configs" / "tipgraph.yaml")
    settings = TipgraphSettings(
        **{
            **base.model_dump(exclude={"store", "serve", "bus"}),
            "serve": {"app_name": APP, "route_prefix": f"/{APP}", "port": serve_port},
            "store": {
                "url": postgres_url,
                "pg_schema": f"e2e_bus_{uuid.uuid4().hex[:8]}",
                "spill_dir": str(tmp / "spill"),
            },
            "bus": bus.model_dump(),
        }
    )
    serve.run(build_graph(settings), name=APP, route_prefix=f"/{APP}")
    app = BusApp(serve_port, settings, postgres_url)
    yield app
    serve.delete(APP)
    drop_schemas(postgres_url, [str(settings.store.pg_schema)])
    asyncio.run(delete_streams(bus))


def _serve_tips(app: BusApp, n: int) -> list[str]:
    def one(i: int) -> str:
        with app.client() as client:
            answer = client.post("/v1/tips", json=tip_body(user_id=f"bus-user-{i}"))
            assert answer.status_code == 200, answer.text
            event_id: str = answer.json()["event_id"]
            return event_id

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


async def _publish(bus: BusSettings, messages: list[tuple[str, str]]) -> None:
    nc = await nats.connect(bus.url)
    js = nc.jetstream()
    await ensure_streams(js, bus)
    for event_id, reaction in messages:
        await js.publish(bus.subject, encode_reaction(event_id, reaction))
    await nc.close()


async def _decision_event_ids(bus: BusSettings) -> list[str]:
    nc = await nats.connect(bus.url)
    js = nc.jetstream()
    stream = bus.decision_events.stream
    info = await js.stream_info(stream)
    ids = []
    for seq in range(1, info.state.messages + 1):
        msg = await js.get_msg(stream, seq)
        ids.append((msg.headers or {})[MSG_ID_HEADER])
    await nc.close()
    return ids


async def _dead_letter_reasons(bus: BusSettings) -> list[str]:
    nc = await nats.connect(bus.url)
    js = nc.jetstream()
    info = await js.stream_info(bus.dead_letter_stream)
    reasons = []
    for seq in range(1, info.state.messages + 1):
        msg = await js.get_msg(bus.dead_letter_stream, seq)
        reasons.append((msg.headers or {})[REASON_HEADER])
    await nc.close()
    return reasons


def test_bus_reactions_apply_exactly_once_beside_http_through_a_killed_replica(
    bus_app: BusApp,
) -> None:
    ids = _serve_tips(bus_app, DECISIONS)
    # Stored before any feedback, so HTTP's answers are final (200, not held) and the
    # conflicts below are HTTP's first.
    decisions = "SELECT COUNT(*) FROM decisions"
    _wait_for(lambda: bus_app.query(decisions)[0][0] == DECISIONS, 60)
    rng = random.Random(11)
    reaction_of = {event_id: rng.choice(["done", "snooze", "dismiss"]) for event_id in ids}
    same, other = ids[:HTTP_SAME], ids[HTTP_SAME : HTTP_SAME + HTTP_OTHER]
    with bus_app.client() as client:
        for event_id in same:
            answer = client.post("/v1/feedback", json={"event_id": event_id, "reaction": "done"})
            assert answer.status_code == 200, answer.text
            reaction_of[event_id] = "done"
        for event_id in other:
            answer = client.post("/v1/feedback", json={"event_id": event_id, "reaction": "dismiss"})
            assert answer.status_code == 200, answer.text
    on_bus = {**reaction_of, **dict.fromkeys(other, "done")}  # `other` conflicts with HTTP
    messages = [(e, on_bus[e]) for e in ids]
    messages += [(e, on_bus[e]) for e in rng.sample(ids[HTTP_SAME + HTTP_OTHER :], DUPLICATES)]
    rng.shuffle(messages)
    before = _replica_pids(APP, BUS_DEPLOYMENT)
    assert len(before) == 1

    asyncio.run(_publish(bus_app.bus, messages))
    rewards = "SELECT COUNT(*) FROM rewards WHERE source = 'feedback'"
    _wait_for(lambda: bus_app.query(rewards)[0][0] >= 300, 120)
    (pid,) = before.values()
    os.kill(pid, signal.SIGKILL)  # a crash: whatever it had pulled and not acked comes again
    assert bus_app.query(rewards)[0][0] < DECISIONS, "all applied before the kill: untested"
    # Serve replaces the killed replica, which takes what it left after ack_wait.
    _wait_for(lambda: set(_replica_pids(APP, BUS_DEPLOYMENT).values()) - {pid} != set(), 120)

    def settled() -> bool:
        return bus_app.readyz_bus().get("lag") == 0 and bus_app.query(rewards)[0][0] == DECISIONS

    _wait_for(settled, 120)

    rows = bus_app.query(
        "SELECT f.event_id, f.reaction, COUNT(r.reward_id) FROM feedback f "
        "LEFT JOIN rewards r ON r.event_id = f.event_id GROUP BY f.event_id, f.reaction"
    )
    stored = {event_id: reaction for event_id, reaction, _ in rows}
    assert all(count == 1 for _, _, count in rows), "a reaction was learned twice"
    # HTTP came first for `other`: its dismiss stands, the bus's done was a conflict.
    assert stored == {**reaction_of, **dict.fromkeys(other, "dismiss")}
    assert sorted(asyncio.run(_dead_letter_reasons(bus_app.bus))) == ["conflict"] * HTTP_OTHER
    # The served policy learned every reward once (directly or by syncing the log).
    from ray import serve

    scoring = serve.get_deployment_handle("scoring", app_name=APP)

    def learned() -> int:
        n_updates: int = scoring.snapshot.remote().result(timeout_s=30)["n_updates"]
        return n_updates

    _wait_for(lambda: learned() == DECISIONS, 60)
    bus = bus_app.readyz_bus()
    assert bus["connected"] is True and bus["lag"] == 0
    # Every decision went out as an event, once, through the replica that was killed too.
    outbox = "SELECT COUNT(*) FROM decision_outbox"
    _wait_for(lambda: bus_app.query(outbox)[0][0] == 0, 60)
    assert sorted(asyncio.run(_decision_event_ids(bus_app.bus))) == sorted(ids)
