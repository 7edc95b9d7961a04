"""End to end: LLM generation through the real Serve graph, real LiteLLM, real Postgres, and a
local server speaking the Ollama chat API in every fault mode."""

from __future__ import annotations

import json
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml

from graphs.tipgraph import PROJECT_ROOT, build_graph
from tests.conftest import AUTH_HEADERS, drop_schemas
from tests.factories import tip_body
from tests.ollama_stub import OllamaStub
from tipgraph.settings import TipgraphSettings, load_settings
from tipgraph.store.packing import unpack_candidates
from tipgraph.text import unsafe_character

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

TIMEOUT_S = 1.0
REQUESTS_PER_MODE = 12
FAULT_TABLE: list[str] = []


class LLMApp:
    def __init__(self, name: str, port: int, settings: TipgraphSettings, postgres_url: str):
        self.name = name
        self.settings = settings
        self.postgres_url = postgres_url
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/{name}", timeout=30, headers=AUTH_HEADERS
        )

    def decision(self, event_id: str) -> tuple[Any, ...]:
        schema = self.settings.store.pg_schema
        with psycopg.connect(self.postgres_url, options=f"-c search_path={schema}") as conn:
            for _ in range(100):  # the decision log writes off the hot path
                row = conn.execute(
                    "SELECT generation_source, generation_reason, llm_model, prompt_version "
                    "FROM decisions WHERE event_id = %s",
                    (event_id,),
                ).fetchone()
                if row is not None:
                    return tuple(row)
                time.sleep(0.05)
        raise AssertionError(f"decision {event_id} was never logged")

    def llm_candidates(self, event_id: str) -> list[tuple[Any, ...]]:
        schema = self.settings.store.pg_schema
        with psycopg.connect(self.postgres_url, options=f"-c search_path={schema}") as conn:
            row = conn.execute(
                "SELECT candidates FROM decisions WHERE event_id = %s", (event_id,)
            ).fetchone()
        texts = unpack_candidates(row[0]).texts if row is not None else []
        return [(t.model, t.prompt_version) for t in texts if t.source == "llm"]


@pytest.fixture(scope="module")
def stub() -> Iterator[OllamaStub]:
    server = OllamaStub().start()
    yield server
    server.stop()


def _deploy(
    name: str,
    *,
    port: int,
    postgres_url: str,
    stub: OllamaStub,
    tmp: Path,
    model: str = "ollama_chat/llama3.2:3b",
    source: str = "mixed",
    breaker: dict[str, float] | None = None,
) -> LLMApp:
    from ray import serve

    llm_config = tmp / f"{name}-llm.yaml"
    llm_config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": "tip-generator",
                        "litellm_params": {"model": model, "api_base": stub.url},
                    }
                ],
                "router_settings": {"num_retries": 0},
            }
        )
    )
    base = load_settings(PROJECT_ROOT / "configs" / "tipgraph.yaml")
    settings = TipgraphSettings(
        **{
            **base.model_dump(exclude={"shadows", "store", "serve", "generation"}),
            "serve": {"app_name": name, "route_prefix": f"/{name}", "port": port},
            "store": {
                "url": postgres_url,
                "pg_schema": f"e2e_{name}_{uuid.uuid4().hex[:8]}",
                "spill_dir": str(tmp / "spill"),
            },
            "shadows": [],
            "generation": {
                "source": source,
                # The LLM on the request path: what these tests are about (the pool's
                # own end-to-end test is tests/test_e2e_pool.py).
                "serve_from": "inline",
                "llm_config": str(llm_config),
                "prompts_dir": str(PROJECT_ROOT / "configs" / "prompts"),
                "timeout_s": TIMEOUT_S,
                "prompts": [
                    {"template": "tips_v1", "share": 1},
                    {"template": "tips_v2", "share": 1},
                ],
                "breaker": breaker or {"failure_threshold": 10_000, "reset_after_s": 60},
            },
        }
    )
    serve.run(build_graph(settings), name=name, route_prefix=f"/{name}")
    return LLMApp(name, port, settings, postgres_url)


@pytest.fixture(scope="module")
def llm_app(
    serve_port: int, postgres_url: str, stub: OllamaStub, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LLMApp]:
    from ray import serve

    app = _deploy(
        "llm",
        port=serve_port,
        postgres_url=postgres_url,
        stub=stub,
        tmp=tmp_path_factory.mktemp("llm"),
    )
    yield app
    app.client.close()
    serve.delete("llm")
    drop_schemas(postgres_url, [str(app.settings.store.pg_schema)])


def test_llm_tips_reach_the_response_and_the_decision_log(
    llm_app: LLMApp, stub: OllamaStub
) -> None:
    stub.mode = "good"
    seen_versions = set()
    for i in range(8):
        response = llm_app.client.post("/v1/tips", json=tip_body(user_id=f"llm-{i}"))
        assert response.status_code == 200, response.text
        answer = response.json()
        ids = [r["candidate_id"] for r in answer["ranking"]]
        assert sum("-llm" in c for c in ids) >= 1 and sum("-llm" not in c for c in ids) >= 1
        source, reason, model, prompt_version = llm_app.decision(answer["event_id"])
        assert (source, reason, model) == ("mixed", None, "ollama_chat/llama3.2:3b")
        assert prompt_version.split("-")[0] in {"tips_v1", "tips_v2"}
        seen_versions.add(prompt_version)
        rows = llm_app.llm_candidates(answer["event_id"])
        assert rows and all(row == (model, prompt_version) for row in rows)
        if answer["tip"]["source"] == "llm":
            assert answer["tip"]["model"] == model
            assert answer["tip"]["prompt_version"] == prompt_version
    assert len(seen_versions) == 2, "the A/B split should send traffic to both prompts"


def test_a_row_postgres_refuses_is_dead_lettered_and_blocks_no_other_decision(
    serve_port: int, postgres_url: str, stub: OllamaStub, tmp_path: Path
) -> None:
    """The poison-row scenario.  A NUL byte from the model used to be one (Postgres refuses
    NUL in text, and the writer retried it forever): now text is cleaned first, which the
    first requests check.  Then a row Postgres really refuses, through a CHECK constraint
    added for the test, on every other request.  Every tip is the model's (source llm)."""
    from ray import serve

    app = _deploy(
        "poison", port=serve_port, postgres_url=postgres_url, stub=stub, tmp=tmp_path, source="llm"
    )
    schema = str(app.settings.store.pg_schema)
    clean = json.dumps(
        {"tips": [{"content": f"Walk {i} minutes.", "kind": "focus"} for i in range(6)]}
    )
    poison = json.dumps({"tips": [{"content": f"POISON {i}", "kind": "focus"} for i in range(6)]})
    hostile = [
        {"content": f"Plan\u0000 your \u202eday {i}, then rest\ud800.", "kind": "focus"}
        for i in range(6)
    ]
    try:
        stub.mode, stub.content = "good", json.dumps({"tips": hostile})
        for i in range(3):
            response = app.client.post("/v1/tips", json=tip_body(user_id=f"nul-{i}"))
            assert response.status_code == 200, response.text
            shown = response.json()["tip"]["content"]
            assert shown.startswith("Plan your day") and shown.endswith("then rest\ufffd.")
            assert app.decision(response.json()["event_id"])  # logged, not stuck
            with psycopg.connect(postgres_url, options=f"-c search_path={schema}") as conn:
                (packed, chosen_content) = conn.execute(
                    "SELECT candidates, chosen_content FROM decisions WHERE event_id = %s",
                    (response.json()["event_id"],),
                ).fetchone()
            # Only the shown tip keeps its text, on the decision row (the packed candidates
            # leave it there).
            texts = [t.content for t in unpack_candidates(packed).texts if t.content]
            assert texts == [] and chosen_content == shown and unsafe_character(shown) is None
        with psycopg.connect(postgres_url, options=f"-c search_path={schema}") as conn:
            conn.execute(
                "ALTER TABLE decisions ADD CONSTRAINT refuse_poison "
                "CHECK (chosen_content IS NULL OR chosen_content NOT LIKE 'POISON%%')"
            )
        answered, poisoned = [], []
        for i in range(12):
            stub.content = poison if i % 2 else clean
            response = app.client.post("/v1/tips", json=tip_body(user_id=f"p-{i}"))
            assert response.status_code == 200, response.text
            event_id = response.json()["event_id"]
            answered.append(event_id)
            if response.json()["tip"]["content"].startswith("POISON"):
                poisoned.append(event_id)
        assert len(poisoned) == 6
        letters = Path(app.settings.store.spill_dir) / "dead-letters.jsonl"

        def settled() -> bool:
            return letters.exists() and len(letters.read_text().splitlines()) >= len(poisoned)

        deadline = time.monotonic() + 60
        while not settled() and time.monotonic() < deadline:
            time.sleep(0.2)
        dead = [json.loads(line) for line in letters.read_text().splitlines()]
        assert {d["entry"]["row"]["event_id"] for d in dead} == set(poisoned)
        assert all("refuse_poison" in d["error"] for d in dead)
        with psycopg.connect(postgres_url, options=f"-c search_path={schema}") as conn:
            stored = {
                row[0]
                for row in conn.execute(
                    "SELECT event_id FROM decisions WHERE event_id = ANY(%s)", (answered,)
                ).fetchall()
            }
        assert stored == set(answered) - set(poisoned)  # nothing else waited or was lost
        ready = app.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["decision_log_dead_letters"] == 6
        assert ready.json()["decision_log_backlog"] == 0
        print(f"poison: {len(answered)} tips, {len(dead)} dead-lettered, {len(stored)} stored")
    finally:
        stub.content = None
        app.client.close()
        serve.delete("poison")
        drop_schemas(postgres_url, [schema])


@pytest.mark.parametrize("mode", ["good", "partial", "slow", "error", "malformed", "recover"])
def test_every_fault_mode_is_served_in_time(llm_app: LLMApp, stub: OllamaStub, mode: str) -> None:
    stub.fail_times = 3
    stub.mode = mode  # "recover": HTTP 500 three times, then good answers
    stub.delay_s = 3 * TIMEOUT_S
    statuses, sources, served_ms, client_ms = Counter(), Counter(), [], []
    for i in range(REQUESTS_PER_MODE):
        start = time.perf_counter()
        response = llm_app.client.post("/v1/tips", json=tip_body(user_id=f"{mode}-{i}"))
        client_ms.append((time.perf_counter() - start) * 1000)
        statuses[response.status_code] += 1
        assert response.status_code == 200, response.text
        served_ms.append(response.json()["latency_ms"]["total"])
        source, reason, _, _ = llm_app.decision(response.json()["event_id"])
        sources[source] += 1
        if source == "fallback":
            assert reason
    p99 = statistics.quantiles(served_ms, n=100, method="inclusive")[98]
    FAULT_TABLE.append(
        f"| {mode} | {dict(statuses)} | {dict(sources)} | {statistics.median(served_ms):.0f} "
        f"| {p99:.0f} | {max(client_ms):.0f} |"
    )
    print(
        "\n".join(
            [
                "| mode | status | generation source | served p50 ms | served p99 ms "
                "| client max ms |",
                "| --- | --- | --- | --- | --- | --- |",
                *FAULT_TABLE,
            ]
        )
    )
    expected = {
        "good": Counter(mixed=REQUESTS_PER_MODE),
        "partial": Counter(mixed=REQUESTS_PER_MODE),
        "recover": Counter(fallback=3, mixed=REQUESTS_PER_MODE - 3),
    }.get(mode, Counter(fallback=REQUESTS_PER_MODE))
    assert sources == expected
    assert p99 <= TIMEOUT_S * 1000 + 100


def test_breaker_opens_and_closes_through_serve(
    serve_port: int, postgres_url: str, stub: OllamaStub, tmp_path: Path
) -> None:
    from ray import serve

    app = _deploy(
        "breaker",
        port=serve_port,
        postgres_url=postgres_url,
        stub=stub,
        tmp=tmp_path,
        model="ollama_chat/qwen2.5:1.5b",
        source="llm",
        breaker={"failure_threshold": 2, "reset_after_s": 1.5},
    )
    try:
        stub.mode = "error"
        reasons = []
        for i in range(4):
            answer = app.client.post("/v1/tips", json=tip_body(user_id=f"b{i}")).json()
            reasons.append(app.decision(answer["event_id"])[1])
        calls_while_open = len(stub.requests)
        assert reasons[0].startswith("llm error") and reasons[1].startswith("llm error")
        assert reasons[2:] == ["circuit open", "circuit open"]
        handle = serve.get_deployment_handle("generation", app_name="breaker")
        assert handle.breaker_state.remote().result()["state"] == "open"

        stub.mode = "good"
        time.sleep(1.6)
        answer = app.client.post("/v1/tips", json=tip_body(user_id="b-back")).json()
        source, reason, model, _ = app.decision(answer["event_id"])
        # Same code, another alias target in llm.yaml: the decision records the new model.
        assert (source, reason, model) == ("llm", None, "ollama_chat/qwen2.5:1.5b")
        assert len(stub.requests) == calls_while_open + 1
        assert handle.breaker_state.remote().result() == {"state": "closed", "times_opened": 1}
    finally:
        app.client.close()
        serve.delete("breaker")
        drop_schemas(postgres_url, [str(app.settings.store.pg_schema)])
