"""Shared pytest fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tipgraph.serve_config import SERVE_ENV
from tipgraph.settings import BusSettings, StoreSettings
from tipgraph.store import DecisionStore, open_store

# ---------------------------------------------------------------------------------------------
# Decision store: SQLite in tmp_path, and Postgres with one throw-away schema per test.
# ---------------------------------------------------------------------------------------------

# Every app the tests start requires this bearer token on /v1 (settings read it at load).
TEST_API_TOKEN = "tipgraph-test-token"
os.environ["TIPGRAPH_API_TOKEN"] = TEST_API_TOKEN
AUTH_HEADERS = {"Authorization": f"Bearer {TEST_API_TOKEN}"}
# ... and a user-key secret: nothing that serves starts without one.
TEST_USER_KEY_SECRET = "tipgraph-test-user-key-secret-never-in-production"
os.environ["TIPGRAPH_PRIVACY__USER_KEY_SECRET"] = TEST_USER_KEY_SECRET

# Ray 2.60's direct ingress keeps a stopping ingress replica reachable for 30 s, so that a
# load balancer can deregister it: every app a test deletes waited that long (six of them
# cost CI three minutes). Tests have no load balancer; production keeps Ray's 30 s. Set
# here, before any cluster starts, so the subprocesses' clusters inherit it too.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")

PG_URL_ENV = "TIPGRAPH_TEST_PG_URL"
# The local test server trusts TCP connections from 127.0.0.1; "postgres" is its superuser.
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _server_name(url: str) -> str:
    """host:port/dbname, so a password in the URL never reaches the test report."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of a reachable Postgres; skips the test when there is none, fails it in CI."""
    url = os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as err:
        message = (
            f"Postgres at {_server_name(url)} is unreachable ({err}). "
            f"Start it or point ${PG_URL_ENV} at one."
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)  # CI must exercise Postgres, never silently skip it
        pytest.skip(message)
    return url


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A fresh schema name for one test; the store creates it, teardown drops it."""
    schema = f"test_{uuid.uuid4().hex[:16]}"
    yield schema
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    """Settings for a new, empty store of each backend (open more than one with them)."""
    if request.param == "sqlite":
        return StoreSettings(url=f"sqlite:///{tmp_path / 'store' / 'tipgraph.db'}")
    # Requested lazily so that SQLite tests run even where Postgres is missing.
    return postgres_store_settings(
        request.getfixturevalue("postgres_url"), request.getfixturevalue("pg_schema")
    )


def postgres_store_settings(url: str, schema: str) -> StoreSettings:
    """A Postgres store confined to ``schema``, with a small pool."""
    return StoreSettings(url=url, pg_schema=schema, pool_min_size=1, pool_max_size=4)


@pytest.fixture
def store(store_settings: StoreSettings) -> Iterator[DecisionStore]:
    """An opened (migrated) store of each backend, closed after the test."""
    opened = open_store(store_settings)
    yield opened
    opened.close()


# ---------------------------------------------------------------------------------------------
# Ray Serve: one local cluster for every end-to-end module (starting one takes ~10 s).
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # One Ray cluster at a time: a rehearsal starts its own three-node cluster, so it runs
    # before anything starts the session's (ray_cluster), which lives until the end.
    items.sort(key=lambda item: item.get_closest_marker("rehearsal") is None)


@pytest.fixture(scope="session")
def ray_metrics_port() -> int:
    """Where the session cluster's node serves its Prometheus metrics (GET /metrics)."""
    return free_port()


@pytest.fixture(scope="session")
def ray_cluster(ray_metrics_port: int) -> Iterator[None]:
    """One local Ray cluster for every test that needs Ray (Serve apps, Tune sweeps)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # As `tipgraph serve` runs it (throughput mode, HAProxy), so the e2e tests cover that.
    for name, value in SERVE_ENV.items():
        os.environ.setdefault(name, value)
    import ray

    # Logical CPUs: the deployments ask fractions, and several test apps run side by side.
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        # As `tipgraph serve` exports them (metrics.export_port), on a port of its own.
        _metrics_export_port=ray_metrics_port,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster: None) -> Iterator[int]:
    """Serve's HTTP proxy on a free loopback port of the shared cluster."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()


def drop_schemas(postgres_url: str, schemas: Iterable[str]) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# ---------------------------------------------------------------------------------------------
# NATS JetStream: the machine's server (make test starts it if down); streams per test.
# ---------------------------------------------------------------------------------------------

NATS_URL_ENV = "TIPGRAPH_TEST_NATS_URL"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


@pytest.fixture(scope="session")
def nats_url() -> str:
    """URL of a reachable NATS server; skips the test when there is none, fails it in CI."""
    url = os.environ.get(NATS_URL_ENV, DEFAULT_NATS_URL)
    host, _, port = url.removeprefix("nats://").partition(":")
    try:
        socket.create_connection((host, int(port or 4222)), timeout=5).close()
    except OSError as err:
        message = f"NATS at {host}:{port} is unreachable ({err}). Start it (make nats)."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url


def test_bus_settings(url: str, **overrides: object) -> BusSettings:
    """Bus settings with streams, subjects and a durable consumer of the test's own, and
    waits short enough for a test."""
    suffix = uuid.uuid4().hex[:8]
    fields: dict[str, object] = {
        "url": url,
        "reactions": True,
        "stream": f"TEST_REACTIONS_{suffix}",
        "subject": f"test.{suffix}.reactions",
        "durable": f"test-{suffix}",
        "dead_letter_stream": f"TEST_DEAD_LETTERS_{suffix}",
        "dead_letter_subject": f"test.{suffix}.dead",
        "decision_events": {
            "stream": f"TEST_DECISIONS_{suffix}",
            "subject": f"test.{suffix}.decisions",
            "interval_s": 0.2,
        },
        "ack_wait_s": 2.0,
        "retry_delay_s": 0.2,
        "decision_wait_s": 2.0,
        "lag_interval_s": 0.2,
        **overrides,
    }
    return BusSettings.model_validate(fields)


test_bus_settings.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


@pytest.fixture
def bus_settings(nats_url: str) -> Iterator[BusSettings]:
    bus = test_bus_settings(nats_url)
    yield bus
    asyncio.run(delete_streams(bus))


async def delete_streams(bus: BusSettings) -> None:
    import nats  # only the bus tests connect

    nc = await nats.connect(bus.url)
    js = nc.jetstream()
    for stream in (bus.stream, bus.dead_letter_stream, bus.decision_events.stream):
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)
    await nc.close()
