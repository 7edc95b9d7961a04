"""A database outage in the middle of a load: nothing served is lost, nothing written twice.

The real Postgres sits behind a loopback proxy the test cuts for a few seconds while tips
and feedback keep coming. During the cut, tips are still served (without history), their
decisions wait in the writer (spilling to disk past a small bound), and feedback is held.
After the cut, everything lands exactly once.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import drop_schemas
from tests.factories import local_service, tip_body
from tests.tcp_proxy import TcpProxy
from tipgraph.contracts import FeedbackRequest, TipRequest
from tipgraph.decision_log import DecisionLog
from tipgraph.settings import TipgraphSettings
from tipgraph.store import open_store

pytestmark = pytest.mark.postgres

REQUESTS = 240
CONCURRENCY = 4
CUT_AT, RESTORE_AT = 60, 160  # request numbers: the outage spans 100 requests


@pytest.fixture
def proxied(postgres_url: str) -> Iterator[tuple[TcpProxy, str, str]]:
    info = psycopg.conninfo.conninfo_to_dict(postgres_url)
    proxy = TcpProxy((str(info.get("host", "127.0.0.1")), int(info.get("port", 5432))))
    schema = f"outage_{uuid.uuid4().hex[:10]}"
    url = f"postgresql://{info.get('user', 'postgres')}@127.0.0.1:{proxy.port}/{info['dbname']}"
    try:
        yield proxy, url, schema
    finally:
        proxy.close()
        drop_schemas(postgres_url, [schema])


async def test_an_outage_mid_load_loses_nothing_and_writes_nothing_twice(
    proxied: tuple[TcpProxy, str, str], postgres_url: str, tmp_path: Path
) -> None:
    proxy, url, schema = proxied
    settings = TipgraphSettings(
        store={"url": url, "pg_schema": schema, "timeout_s": 0.5, "flush_interval_s": 0.02},
        shadows=[],
    )
    store = open_store(settings.store)
    log = DecisionLog(
        store,
        flush_interval_s=0.02,
        batch_size=64,
        max_buffered=40,
        spill_dir=tmp_path / "spill",
        owner="ingress",
    )
    service = local_service(settings, store, log)
    rng = random.Random(7)
    served: list[str] = []
    feedback: dict[str, str] = {}
    statuses: dict[str, int] = {"applied": 0, "pending": 0}
    most_spilled = 0
    counter = iter(range(REQUESTS))

    async def worker() -> None:
        nonlocal most_spilled
        for n in counter:
            if n == CUT_AT:
                proxy.cut()
            elif n == RESTORE_AT:
                proxy.restore()
            tip = await service.tip(TipRequest(**tip_body(user_id=f"user-{n % 13}")))
            served.append(tip.event_id)
            most_spilled = max(most_spilled, log.spilled)
            if rng.random() < 0.6:
                reaction = rng.choice(["done", "snooze", "dismiss"])
                answer = await service.feedback(
                    FeedbackRequest(event_id=tip.event_id, reaction=reaction)  # type: ignore[arg-type]
                )
                feedback[tip.event_id] = reaction
                statuses[answer.status] += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await service.close()  # the graceful shutdown: drain the writer, apply held feedback
    elapsed = time.monotonic() - started
    store.close()

    # The outage was real: decisions spilled to disk and feedback had to be held.
    assert most_spilled > 0 and statuses["pending"] > 0, (most_spilled, statuses)
    assert service.held_feedback == 0 and log.backlog == 0 and log.spilled == 0

    with psycopg.connect(postgres_url, options=f"-c search_path={schema}") as conn:
        decisions = [r[0] for r in conn.execute("SELECT event_id FROM decisions")]
        stored = dict(conn.execute("SELECT event_id, reaction FROM feedback").fetchall())
        rewards = conn.execute("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM rewards").fetchone()
    assert len(served) == REQUESTS
    assert sorted(decisions) == sorted(served)  # every served decision, once
    assert stored == feedback  # every accepted feedback, once, as sent
    assert rewards == (len(feedback), len(feedback))
    print(
        f"outage test: {REQUESTS} tips served, {len(decisions)} decisions logged, "
        f"{len(feedback)} feedback accepted ({statuses['pending']} held during the cut), "
        f"{len(stored)} feedback rows, {rewards[0]} rewards; up to {most_spilled} rows "
        f"spilled; {elapsed:.1f} s"
    )


async def test_the_same_feedback_racing_on_two_replicas_is_applied_once(
    postgres_url: str, pg_schema: str
) -> None:
    """Two ingress replicas (own services, own policies) get the same feedback at once."""
    settings = TipgraphSettings(store={"url": postgres_url, "pg_schema": pg_schema}, shadows=[])
    stores = [open_store(settings.store) for _ in range(2)]
    services = [local_service(settings, s) for s in stores]
    tips = [await services[0].tip(TipRequest(**tip_body(user_id=f"race-{i}"))) for i in range(20)]
    await services[0].log.flush()
    for tip in tips:
        answers = await asyncio.gather(
            *(
                service.feedback(FeedbackRequest(event_id=tip.event_id, reaction="snooze"))
                for service in services
            )
        )
        assert answers[0] == answers[1] and answers[0].status == "applied"
    counts = stores[0].counts()
    assert (counts.feedback, counts.rewards) == (20, 20)
    # Each reward was learned once in all: by exactly one of the two replicas right away.
    learned = [s.stages.served.policy.n_updates for s in services]  # type: ignore[attr-defined]
    assert sum(learned) == 20
    for service, store in zip(services, stores, strict=True):
        await service.close()
        store.close()
