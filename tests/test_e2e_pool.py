"""End to end: LLM tips from the candidate pool through the real Serve graph, real LiteLLM
(all three aliases) and real Postgres, against the Ollama-protocol stub with a slow model.

After the first request of a task set (a miss: task tips at once, a refill sent to the
pool deployment), the user's requests are served from the pool, and the served latency
does not include the model's delay."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from graphs.tipgraph import PROJECT_ROOT, build_graph
from tests.conftest import AUTH_HEADERS, drop_schemas
from tests.factories import tip_body
from tests.ollama_stub import OllamaStub, write_llm_config
from tipgraph.settings import TipgraphSettings, load_settings
from tipgraph.store.packing import unpack_candidates

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

GENERATION_DELAY_S = 3.0
APP = "pool"


class PoolApp:
    def __init__(self, port: int, settings: TipgraphSettings, postgres_url: str) -> None:
        self.settings = settings
        self.postgres_url = postgres_url
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/{APP}", timeout=30, headers=AUTH_HEADERS
        )

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        schema = self.settings.store.pg_schema
        with psycopg.connect(self.postgres_url, options=f"-c search_path={schema}") as conn:
            return [tuple(row) for row in conn.execute(sql, params).fetchall()]

    def decision(self, event_id: str) -> tuple[Any, ...]:
        for _ in range(200):  # the decision log writes off the hot path
            rows = self.query(
                "SELECT generation_source, llm_pool, llm_pool_age_s, llm_model, prompt_version "
                "FROM decisions WHERE event_id = %s",
                event_id,
            )
            if rows:
                return rows[0]
            time.sleep(0.05)
        raise AssertionError(f"decision {event_id} was never logged")

    def wait_for_pool(self, entries: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.query("SELECT COUNT(*) FROM tip_pool WHERE tips IS NOT NULL")[0][0] >= entries:
                return
            time.sleep(0.1)
        raise AssertionError(f"the pool never held {entries} entries")


@pytest.fixture(scope="module")
def stub() -> Iterator[OllamaStub]:
    server = OllamaStub().start()
    server.latency_s = {"chat": GENERATION_DELAY_S, "judge": 0.3, "embed": 0.05}
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pool_app(
    serve_port: int, postgres_url: str, stub: OllamaStub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PoolApp]:
    from ray import serve

    tmp: Path = tmp_path_factory.mktemp("pool")
    llm_config = write_llm_config(tmp / "llm.yaml", stub)
    base = load_settings(PROJECT_ROOT / "configs" / "tipgraph.yaml")
    settings = TipgraphSettings(
        **{
            **base.model_dump(exclude={"shadows", "store", "serve", "generation"}),
            "serve": {"app_name": APP, "route_prefix": f"/{APP}", "port": serve_port},
            "store": {
                "url": postgres_url,
                "pg_schema": f"e2e_pool_{uuid.uuid4().hex[:8]}",
                "spill_dir": str(tmp / "spill"),
            },
            "shadows": [],
            "generation": {
                "source": "mixed",
                "serve_from": "pool",
                "llm_config": str(llm_config),
                "prompts_dir": str(PROJECT_ROOT / "configs" / "prompts"),
                "timeout_s": 10.0,
            },
        }
    )
    serve.run(build_graph(settings), name=APP, route_prefix=f"/{APP}")
    app = PoolApp(serve_port, settings, postgres_url)
    yield app
    app.client.close()
    serve.delete(APP)
    drop_schemas(postgres_url, [str(settings.store.pg_schema)])


def test_after_warm_up_tips_come_from_the_pool_without_the_models_delay(
    pool_app: PoolApp, stub: OllamaStub
) -> None:
    body = tip_body(user_id=f"pool-{uuid.uuid4().hex[:6]}")
    first = pool_app.client.post("/v1/tips", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["latency_ms"]["total"] < GENERATION_DELAY_S * 1000
    source, pool, age, model, prompt_version = pool_app.decision(first.json()["event_id"])
    assert (source, pool, age, model) == ("fallback", "miss", None, None)
    assert prompt_version.startswith(("tips_v1-", "tips_v2-"))

    pool_app.wait_for_pool(1)
    served = []
    for _ in range(3):
        answer = pool_app.client.post("/v1/tips", json=body).json()
        served.append(answer)
        source, pool, age, model, version = pool_app.decision(answer["event_id"])
        assert (source, pool, model, version) == (
            "mixed",
            "hit",
            "ollama_chat/llama3.2:3b",
            prompt_version,
        )
        assert age is not None and age >= 0
        assert any("-llm" in r["candidate_id"] for r in answer["ranking"])
    # Served at task-mode speed: none of them waited for the model's 3 s.
    assert max(a["latency_ms"]["total"] for a in served) < GENERATION_DELAY_S * 1000
    assert len(stub.judge_requests) >= 1 and len(stub.embed_requests) >= 1
    (packed,) = pool_app.query(
        "SELECT candidates FROM decisions WHERE event_id = %s", served[0]["event_id"]
    )
    candidates = [
        (t.model, t.prompt_version) for t in unpack_candidates(packed[0]).texts if t.source == "llm"
    ]
    assert candidates and set(candidates) == {("ollama_chat/llama3.2:3b", prompt_version)}


def test_erasing_a_user_erases_their_pool_entries(pool_app: PoolApp) -> None:
    user = f"pool-erase-{uuid.uuid4().hex[:6]}"
    count_pool, count_embeddings = (
        "SELECT COUNT(*) FROM tip_pool",
        ("SELECT COUNT(*) FROM tip_embeddings"),
    )
    before = pool_app.query(count_pool)[0][0], pool_app.query(count_embeddings)[0][0]
    assert pool_app.client.post("/v1/tips", json=tip_body(user_id=user)).status_code == 200
    pool_app.wait_for_pool(before[0] + 1)
    assert pool_app.query(count_embeddings)[0][0] > before[1]
    erased = pool_app.client.delete(f"/v1/users/{user}")
    assert erased.status_code == 200, erased.text
    after = pool_app.query(count_pool)[0][0], pool_app.query(count_embeddings)[0][0]
    assert after == before


def test_refills_run_in_the_pool_deployment_at_lower_cpu_priority(pool_app: PoolApp) -> None:
    from ray import serve

    pool_app.client.post("/v1/tips", json=tip_body(user_id=f"pool-{uuid.uuid4().hex[:6]}"))
    pool_app.wait_for_pool(1)
    refills = serve.get_deployment_handle("pool", app_name=APP)
    status = refills.status.remote().result()
    # Below every other replica's priority (Ray starts them all at the same niceness).
    increment = pool_app.settings.generation.pool.nice
    assert status["nice"] == min(status["nice_before"] + increment, 19) > status["nice_before"]
    assert status["outcomes"].get("filled", 0) >= 1
    assert refills.breaker_state.remote().result()["state"] == "closed"
    # The generation replicas call no model: the breaker lives where the refills run.
    generation = serve.get_deployment_handle("generation", app_name=APP)
    assert generation.breaker_state.remote().result() == {"state": "none", "times_opened": 0}
