"""The decision log under Serve: a SIGKILLed ingress during a database outage, and an
erasure racing live traffic on two ingress replicas.  Real Serve over HTTP, real Postgres
(behind a loopback proxy that can cut it), real processes killed by PID."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from graphs.tipgraph import build_graph
from tests.conftest import AUTH_HEADERS, drop_schemas
from tests.factories import tip_body
from tests.tcp_proxy import TcpProxy
from tipgraph.settings import DeploymentSettings, TipgraphSettings
from tipgraph.store import open_store

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("ray_cluster")]


def _wait_for(condition: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def _proxied(postgres_url: str) -> tuple[TcpProxy, str]:
    """A proxy in front of the database, and the URL that goes through it."""
    info = psycopg.conninfo.conninfo_to_dict(postgres_url)
    proxy = TcpProxy((str(info.get("host", "127.0.0.1")), int(info.get("port", 5432))))
    user = info.get("user", "postgres")
    return proxy, f"postgresql://{user}@127.0.0.1:{proxy.port}/{info['dbname']}"


@pytest.fixture
def schema(postgres_url: str) -> Iterator[str]:
    name = f"e2e_wal_{uuid.uuid4().hex[:10]}"
    with open_store(TipgraphSettings(store={"url": postgres_url, "pg_schema": name}).store):
        pass  # migrated while the database is reachable
    yield name
    drop_schemas(postgres_url, [name])


def _rows(postgres_url: str, schema: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(postgres_url, options=f"-c search_path={schema}") as conn:
        return conn.execute(query, params).fetchall()


def _deploy(name: str, settings: TipgraphSettings) -> str:
    from ray import serve

    serve.run(build_graph(settings), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{settings.serve.port}/{name}"


def _replica_pids(app: str, deployment: str) -> dict[str, int]:
    """Name -> PID of the live replicas.  From the GCS actor table: the state API
    (``ray.util.state``) needs the dashboard, which the test cluster runs without."""
    from ray._private import state

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {
        info["Name"]: int(info["Pid"])
        for info in state.actors().values()
        if info["State"] == "ALIVE" and str(info["Name"]).startswith(prefix)
    }


def _app_settings(
    serve_port: int, name: str, store: dict[str, Any], ingress_replicas: int = 1
) -> TipgraphSettings:
    base = TipgraphSettings()
    ingress = DeploymentSettings(
        num_cpus=0.1,
        autoscaling={"min_replicas": ingress_replicas, "max_replicas": ingress_replicas},
    )
    return base.model_copy(
        update={
            "serve": base.serve.model_copy(
                update={"app_name": name, "route_prefix": f"/{name}", "port": serve_port}
            ),
            "store": base.store.model_copy(update=store),
            "shadows": [],
            "deployments": {**base.deployments, "ingress": ingress},
        }
    )


@pytest.mark.parametrize("durability", ["durable", "buffered"])
def test_a_sigkilled_ingress_loses_nothing_answered_when_durable(
    serve_port: int, postgres_url: str, schema: str, tmp_path: Path, durability: str
) -> None:
    from ray import serve

    proxy, proxied_url = _proxied(postgres_url)
    name = f"crash_{durability}"
    settings = _app_settings(
        serve_port,
        name,
        {
            "url": proxied_url,
            "pg_schema": schema,
            "durability": durability,
            "spill_dir": str(tmp_path / "spill"),
            "timeout_s": 0.5,
            "flush_interval_s": 0.05,
            "replay_interval_s": 1.0,
        },
    )
    answered: list[str] = []
    try:
        url = _deploy(name, settings)
        with httpx.Client(base_url=url, timeout=60, headers=AUTH_HEADERS) as client:
            for i in range(10):
                tip = client.post("/v1/tips", json=tip_body(user_id=f"c{i % 3}"))
                assert tip.status_code == 200, tip.text
                answered.append(tip.json()["event_id"])

            def written() -> bool:
                query = "SELECT COUNT(*) FROM decisions WHERE event_id = ANY(%s)"
                return _rows(postgres_url, schema, query, answered)[0][0] == len(answered)

            _wait_for(written, 30)  # the steady state: every row out within a flush
            proxy.cut()  # the database is gone: decisions wait in the ingress
            for i in range(30):
                tip = client.post("/v1/tips", json=tip_body(user_id=f"c{i % 3}"))
                if tip.status_code == 200:
                    answered.append(tip.json()["event_id"])
        (victim,) = _replica_pids(name, "ingress").items()
        os.kill(victim[1], signal.SIGKILL)
        _wait_for(lambda: set(_replica_pids(name, "ingress")) - {victim[0]} != set())
        proxy.restore()  # the replacement replays the dead replica's log
        stored: set[str] = set()

        def all_there() -> bool:
            found = _rows(
                postgres_url,
                schema,
                "SELECT event_id FROM decisions WHERE event_id = ANY(%s)",
                answered,
            )
            stored.update(row[0] for row in found)
            return stored >= set(answered)

        if durability == "durable":
            _wait_for(all_there, 120)
            assert set(answered) - stored == set()
            print(f"durable: {len(answered)} answered (30 during the outage), 0 lost")
        else:
            time.sleep(5)  # replay interval and flushes: whatever was on disk is in by now
            all_there()
            lost = set(answered) - stored
            # Buffered keeps rows in memory; the kill loses the ones written nowhere yet:
            # at most those answered during the outage (the documented window).
            assert lost <= set(answered[10:])
            print(f"buffered: {len(answered)} answered, {len(lost)} lost to the SIGKILL")
    finally:
        proxy.restore()
        serve.delete(name)
        proxy.close()


def test_an_erasure_racing_two_ingress_replicas_leaves_nothing_of_the_user(
    serve_port: int, postgres_url: str, schema: str, tmp_path: Path
) -> None:
    from ray import serve

    name = "erase_race"
    settings = _app_settings(
        serve_port,
        name,
        # Rows wait a while in each replica's writer: the erasure finds them buffered.
        {
            "url": postgres_url,
            "pg_schema": schema,
            "spill_dir": str(tmp_path / "spill"),
            "flush_interval_s": 1.5,
            "batch_size": 10_000,
        },
        ingress_replicas=2,
    )
    victim, stop = "erase-me", threading.Event()
    served: dict[str, list[str]] = {victim: [], "other": []}

    def load(user: str) -> None:
        with httpx.Client(base_url=url, timeout=60, headers=AUTH_HEADERS) as client:
            while not stop.is_set():
                tip = client.post("/v1/tips", json=tip_body(user_id=user))
                if tip.status_code == 200:
                    served[user].append(tip.json()["event_id"])

    try:
        url = _deploy(name, settings)
        assert len(_replica_pids(name, "ingress")) == 2
        threads = [threading.Thread(target=load, args=(u,)) for u in (victim, "other") * 3]
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(served[victim]) >= 30, 60)
        stop.set()  # the victim's last requests are in flight, their rows in two writers
        with httpx.Client(base_url=url, timeout=60, headers=AUTH_HEADERS) as client:
            erased = client.delete(f"/v1/users/{victim}")
        for thread in threads:
            thread.join(60)
        assert erased.status_code == 200, erased.text
        time.sleep(2 * 1.5 + 1)  # every writer has flushed at least twice since
        (erased_at,) = _rows(postgres_url, schema, "SELECT erased_at FROM erased_users")[0]
        assert isinstance(erased_at, datetime)
        left = _rows(
            postgres_url,
            schema,
            "SELECT event_id FROM decisions WHERE event_id = ANY(%s) AND created_at <= %s",
            served[victim],
            erased_at,
        )
        assert left == []
        orphans = _rows(
            postgres_url,
            schema,
            "SELECT COUNT(*) FROM policy_runs WHERE event_id = ANY(%s) "
            "AND event_id NOT IN (SELECT event_id FROM decisions)",
            served[victim],
        )
        assert orphans == [(0,)]
        dropped = 0
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(10):  # the proxy spreads /readyz over both replicas
                dropped = max(dropped, client.get("/readyz").json()["decision_log_dropped_erased"])
        others = _rows(
            postgres_url,
            schema,
            "SELECT COUNT(*) FROM decisions WHERE event_id = ANY(%s)",
            served["other"],
        )
        assert others == [(len(served["other"]),)]  # nobody else lost a row
        print(
            f"erasure raced {len(served[victim])} tips of the user on 2 replicas: "
            f"{erased.json()}, {dropped}+ rows dropped on arrival, 0 left"
        )
    finally:
        stop.set()
        serve.delete(name)
