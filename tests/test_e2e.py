"""End to end: the real Serve graph over real HTTP, logging to the real Postgres.

One local Ray cluster serves two applications side by side: ``main`` with healthy shadows
and ``faulty`` whose shadows sleep or raise.  Same code, same config apart from the shadows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
import schemathesis
import yaml

from graphs.tipgraph import PROJECT_ROOT, build_app, build_graph
from tests.conftest import AUTH_HEADERS, drop_schemas
from tests.factories import local_service, tip_body, token_entry, write_tokens
from tipgraph.contracts import TipRequest
from tipgraph.features import FEATURE_SPEC
from tipgraph.settings import StoreSettings, TipgraphSettings, load_settings
from tipgraph.store import open_store
from tipgraph.store.migrate import load_migrations
from tipgraph_ops.cli import main as cli_main

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

HEALTHY_SHADOWS = [
    {"policy": {"name": "egreedy", "kind": "egreedy"}},
    {"policy": {"name": "uniform", "kind": "uniform"}},
]
SHADOW_DELAY_S = 3.0
FAULTY_SHADOWS = [
    {
        "policy": {"name": "slow", "kind": "egreedy"},
        "fault": {"delay_s": SHADOW_DELAY_S},
    },
    {
        "policy": {"name": "broken", "kind": "uniform"},
        "fault": {"fail": True},
    },
]


def _wait_for(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout_s}s")


class App:
    def __init__(self, name: str, url: str, settings: TipgraphSettings, postgres_url: str):
        self.name = name
        self.client = httpx.Client(base_url=url, timeout=30, headers=AUTH_HEADERS)
        self.settings = settings
        self.postgres_url = postgres_url

    def query(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        schema = self.settings.store.pg_schema
        with psycopg.connect(self.postgres_url, options=f"-c search_path={schema}") as conn:
            return conn.execute(query, params).fetchall()

    def scoring_snapshot(self, shadow: str | None = None) -> dict[str, Any]:
        """The served policy's learned state, or the named shadow's."""
        from ray import serve

        deployment = "scoring" if shadow is None else "shadows"
        handle = serve.get_deployment_handle(deployment, app_name=self.name)
        args = () if shadow is None else (shadow,)
        snapshot: dict[str, Any] = handle.snapshot.remote(*args).result(timeout_s=30)
        return snapshot


def post_feedback(app: App, event_id: str, reaction: str) -> dict[str, Any]:
    """Feedback right after its tip. On a loaded machine the decision may not be readable
    within the ingress's flush wait: then it is held (202) and applied a moment later, which
    this waits for (the ingress holds no feedback any more)."""
    answer = app.client.post("/v1/feedback", json={"event_id": event_id, "reaction": reaction})
    assert answer.status_code in (200, 202), answer.text
    if answer.status_code == 202:
        assert answer.json()["status"] == "pending"
        _wait_for(lambda: app.client.get("/readyz").json()["feedback_held"] == 0)
    body: dict[str, Any] = answer.json()
    return body


# The main app also reads a token file, which the scope and rotation tests rewrite; the
# env token (AUTH_HEADERS, every scope) stays valid beside it.
RELOAD_INTERVAL_S = 0.2
RETENTION_INTERVAL_S = 2.0


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.yaml"
    write_tokens(path, token_entry("starter", "tok-starter", "tips"))
    return path


@pytest.fixture(scope="module")
def serve_apps(serve_port: int, postgres_url: str, tokens_file: Path) -> Iterator[dict[str, App]]:
    from ray import serve

    base = load_settings(PROJECT_ROOT / "configs" / "tipgraph.yaml")
    schemas = {name: f"e2e_{name}_{uuid.uuid4().hex[:10]}" for name in ("main", "faulty")}
    apps: dict[str, App] = {}
    try:
        for name, shadows in (("main", HEALTHY_SHADOWS), ("faulty", FAULTY_SHADOWS)):
            settings = TipgraphSettings(
                **{
                    **base.model_dump(exclude={"shadows", "store", "serve"}),
                    "serve": {"app_name": name, "route_prefix": f"/{name}", "port": serve_port},
                    "store": {"url": postgres_url, "pg_schema": schemas[name]},
                    "shadows": shadows,
                    # Often, so that test_the_graph_applies_the_retention sees a run.
                    "retention": {"interval_s": RETENTION_INTERVAL_S},
                    "auth": {
                        "api_token": base.auth.api_token,
                        "tokens_file": str(tokens_file) if name == "main" else None,
                        "reload_interval_s": RELOAD_INTERVAL_S,
                    },
                }
            )
            serve.run(build_graph(settings), name=name, route_prefix=f"/{name}")
            apps[name] = App(name, f"http://127.0.0.1:{serve_port}/{name}", settings, postgres_url)
        yield apps
    finally:
        for name, app in apps.items():
            app.client.close()
            serve.delete(name)
        drop_schemas(postgres_url, schemas.values())


def test_health_and_readiness(serve_apps: dict[str, App]) -> None:
    client = serve_apps["main"].client
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    latest = load_migrations("postgres")[-1].version
    assert ready.status_code == 200 and ready.json()["schema_version"] == latest
    assert "/v1/tips" in client.get("/openapi.json").json()["paths"]


def test_v1_needs_the_bearer_token_and_health_does_not(serve_apps: dict[str, App]) -> None:
    url = str(serve_apps["main"].client.base_url).rstrip("/")
    body = tip_body(user_id="auth")
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        missing = anonymous.post("/v1/tips", json=body)
        assert missing.status_code == 401 and "bearer token" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        basic = anonymous.post("/v1/tips", json=body, headers={"Authorization": "Basic eDp5"})
        assert basic.status_code == 401
        wrong = anonymous.post(
            "/v1/feedback",
            json={"event_id": "x", "reaction": "done"},
            headers={"Authorization": "Bearer not-the-token"},
        )
        assert wrong.status_code == 401 and wrong.json() == {
            "detail": "the bearer token is not valid (unknown or expired)"
        }
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 200
    assert serve_apps["main"].client.post("/v1/tips", json=body).status_code == 200


def _wait_until_accepted(url: str, token: str, timeout_s: float = 30.0) -> None:
    """Until a POST /v1/tips with ``token`` is answered 200 (the file reloaded)."""
    headers = {"Authorization": f"Bearer {token}"}
    _wait_for(
        lambda: httpx.post(f"{url}/v1/tips", json=tip_body(), headers=headers).status_code == 200,
        timeout_s,
    )


# What each token may do (tipgraph/auth.py): the expected status per endpoint.
SCOPE_MATRIX = {
    "tips-only": (("tips",), {"tips": 200, "feedback": 403, "erase": 403}),
    "feedback-only": (("feedback",), {"tips": 403, "feedback": 200, "erase": 403}),
    "erase-only": (("erase",), {"tips": 403, "feedback": 403, "erase": 200}),
    "recommender": (("tips", "feedback"), {"tips": 200, "feedback": 200, "erase": 403}),
    "admin": (("admin",), {"tips": 200, "feedback": 200, "erase": 200}),
}


def test_every_token_reaches_exactly_the_endpoints_of_its_scopes(
    serve_apps: dict[str, App], tokens_file: Path
) -> None:
    app = serve_apps["main"]
    url = str(app.client.base_url).rstrip("/")
    write_tokens(
        tokens_file,
        *(token_entry(name, f"tok-{name}", *scopes) for name, (scopes, _) in SCOPE_MATRIX.items()),
    )
    _wait_until_accepted(url, "tok-admin")
    seen: dict[str, dict[str, int]] = {}
    for name in SCOPE_MATRIX:
        headers = {"Authorization": f"Bearer tok-{name}"}
        event_id = app.client.post("/v1/tips", json=tip_body(user_id="scopes")).json()["event_id"]
        answers = {
            "tips": httpx.post(f"{url}/v1/tips", json=tip_body(), headers=headers),
            "feedback": httpx.post(
                f"{url}/v1/feedback",
                json={"event_id": event_id, "reaction": "done"},
                headers=headers,
            ),
            "erase": httpx.delete(f"{url}/v1/users/scope-{name}", headers=headers),
        }
        # 202: feedback held until its decision can be read: accepted all the same.
        seen[name] = {k: 200 if a.status_code == 202 else a.status_code for k, a in answers.items()}
        for answer in answers.values():
            if answer.status_code == 403:
                detail = answer.json()["detail"]
                assert f"token {name!r}" in detail and "scope" in detail, detail
                assert f"tok-{name}" not in detail
    assert seen == {name: expected for name, (_, expected) in SCOPE_MATRIX.items()}


def test_a_token_rotates_under_load_without_a_failed_request(
    serve_apps: dict[str, App], tokens_file: Path
) -> None:
    """The runbook's rotation (k3s/README.md): add the new token, move every client to it,
    remove the old one.  Clients on either token see no failure during the overlap; the
    old token is refused (401) once it is removed."""
    url = str(serve_apps["main"].client.base_url).rstrip("/")
    old = token_entry("recommender-2026-11", "tok-old", "tips", "feedback")
    new = token_entry("recommender-2026-12", "tok-new", "tips", "feedback")
    write_tokens(tokens_file, old)
    _wait_until_accepted(url, "tok-old")
    statuses: dict[str, list[int]] = {"tok-old": [], "tok-new": []}
    stops = {token: threading.Event() for token in statuses}

    def client(token: str) -> None:
        with httpx.Client(
            base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}
        ) as http:
            while not stops[token].is_set():
                statuses[token].append(http.post("/v1/tips", json=tip_body()).status_code)

    old_clients = [threading.Thread(target=client, args=("tok-old",)) for _ in range(3)]
    new_clients = [threading.Thread(target=client, args=("tok-new",)) for _ in range(3)]
    for thread in old_clients:
        thread.start()
    try:
        time.sleep(1.0)
        write_tokens(tokens_file, old, new)  # the overlap: both valid
        _wait_until_accepted(url, "tok-new")
        for thread in new_clients:
            thread.start()
        time.sleep(2.0)
        stops["tok-old"].set()  # every client has moved to the new token
        for thread in old_clients:
            thread.join()
        write_tokens(tokens_file, new)
        time.sleep(RELOAD_INTERVAL_S * 5)
        refused = httpx.post(
            f"{url}/v1/tips", json=tip_body(), headers={"Authorization": "Bearer tok-old"}
        )
        time.sleep(1.0)
    finally:
        for stop in stops.values():
            stop.set()
        for thread in (*old_clients, *new_clients):
            if thread.is_alive():
                thread.join()
    assert refused.status_code == 401, refused.text
    for token, seen in statuses.items():
        assert len(seen) >= 10, (token, len(seen))
        assert set(seen) == {200}, (token, {s: seen.count(s) for s in set(seen)})


def test_a_user_can_be_erased_over_http(serve_apps: dict[str, App]) -> None:
    app = serve_apps["main"]
    user = f"erase-me-{uuid.uuid4().hex[:6]}"
    events = []
    for _ in range(2):
        tip = app.client.post("/v1/tips", json=tip_body(user_id=user)).json()
        events.append(tip["event_id"])
        post_feedback(app, tip["event_id"], "done")
    rewards_before = app.query("SELECT COUNT(*) FROM rewards")[0][0]
    url = str(app.client.base_url).rstrip("/")
    assert httpx.delete(f"{url}/v1/users/{user}").status_code == 401
    erased = app.client.delete(f"/v1/users/{user}")
    assert erased.status_code == 200
    assert erased.json() == {"decisions_erased": 2, "feedback_erased": 2, "pending_writes": 0}
    assert app.query("SELECT COUNT(*) FROM decisions WHERE event_id = ANY(%s)", events) == [(0,)]
    # Feedback for an erased decision is refused, not held for a decision that never comes.
    late = app.client.post("/v1/feedback", json={"event_id": events[0], "reaction": "snooze"})
    assert late.status_code == 404, late.text
    forged = app.client.post("/v1/feedback", json={"event_id": "f" * 40, "reaction": "done"})
    assert forged.status_code == 404 and "not one tipgraph issued" in forged.json()["detail"]
    assert app.query("SELECT COUNT(*) FROM rewards")[0][0] == rewards_before
    too_long = app.client.delete(f"/v1/users/{'x' * 300}")
    assert too_long.status_code == 422 and "user_id" in too_long.json()["detail"]


def test_the_graph_applies_the_retention_and_keeps_what_was_learned(
    serve_apps: dict[str, App],
) -> None:
    from tests.test_store import make_decision, make_feedback

    app = serve_apps["main"]
    now = datetime.now(UTC)
    days = app.settings.retention.days
    assert days is not None
    old = f"retention-old-{uuid.uuid4().hex[:8]}"
    recent = f"retention-recent-{uuid.uuid4().hex[:8]}"
    with open_store(app.settings.store) as store:
        store.write_decisions(
            [
                make_decision(old, created_at=now - timedelta(days=days + 1)),
                make_decision(recent, created_at=now - timedelta(days=days - 1)),
            ]
        )
        store.record_feedback(make_feedback(old, at=now))
        (reward,) = [e for e in store.training_events() if e.event_id == old]
        # The ingress replicas delete it at their next retention run.
        _wait_for(lambda: store.get_decision(old) is None, timeout_s=RETENTION_INTERVAL_S * 15)
        assert store.get_decision(recent) is not None
        kept = [e for e in store.training_events() if e.reward_id == reward.reward_id]
    assert [(e.event_id, e.features, e.reward) for e in kept] == [
        ("", reward.features, reward.reward)
    ]


def test_tip_decision_shadows_and_feedback_are_logged_and_learned(
    serve_apps: dict[str, App],
) -> None:
    app = serve_apps["main"]
    before = app.scoring_snapshot()
    response = app.client.post("/v1/tips", json=tip_body(user_id="e2e-user"))
    assert response.status_code == 200, response.text
    tip = response.json()
    event_id = tip["event_id"]
    assert tip["policy"]["name"] == "linucb"
    assert sum(r["probability"] for r in tip["ranking"]) == pytest.approx(1.0)
    assert set(tip["latency_ms"]) == {"context", "generation", "scoring", "total"}

    # The decision (its candidates and the served run in its row) and both shadows' runs
    # land in Postgres off the hot path.
    _wait_for(
        lambda: (
            len(app.query("SELECT 1 FROM decisions WHERE event_id = %s", event_id)) == 1
            and len(app.query("SELECT 1 FROM policy_runs WHERE event_id = %s", event_id)) == 2
        )
    )
    (decision,) = app.query(
        "SELECT user_key, policy_name, feature_version, chosen_candidate_id, chosen_probability,"
        " latency_total_ms FROM decisions WHERE event_id = %s",
        event_id,
    )
    assert decision[0] != "e2e-user"  # pseudonymised
    assert decision[1:4] == ("linucb", decision[2], tip["tip"]["candidate_id"])
    assert decision[2] == FEATURE_SPEC.version
    assert decision[4] == pytest.approx(tip["probability"])
    assert decision[5] > 0
    # The served run is the decision's row; each shadow logs its own, with a probability
    # for every candidate (float64 bytes).
    runs = app.query(
        "SELECT policy_name, role, length(probabilities) FROM policy_runs WHERE event_id = %s "
        "ORDER BY policy_name",
        event_id,
    )
    assert runs == [
        ("egreedy", "shadow", 8 * len(tip["ranking"])),
        ("uniform", "shadow", 8 * len(tip["ranking"])),
    ]
    (n_candidates,) = app.query("SELECT n_candidates FROM decisions WHERE event_id = %s", event_id)
    assert n_candidates[0] == len(tip["ranking"])

    feedback = app.client.post("/v1/feedback", json={"event_id": event_id, "reaction": "done"})
    assert feedback.status_code == 200, feedback.text
    assert feedback.json()["reward"] == 1.0
    again = app.client.post("/v1/feedback", json={"event_id": event_id, "reaction": "done"})
    assert again.status_code == 200 and again.json() == feedback.json()
    assert app.query("SELECT reaction, reward FROM feedback WHERE event_id = %s", event_id) == [
        ("done", 1.0)
    ]

    after = app.scoring_snapshot()
    assert after["n_updates"] == before["n_updates"] + 1
    assert after["b"] != before["b"]
    _wait_for(lambda: app.scoring_snapshot(shadow="egreedy")["n_updates"] == after["n_updates"])


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/tips", {"user_id": "u", "tasks": []}, 422, "tasks: List should have at least 1"),
        ("/v1/tips", tip_body(timezone="Nowhere/City"), 422, "unknown IANA timezone"),
        (
            "/v1/tips",
            {"user_id": "u", "tasks": [{"id": "a", "content": "x", "priority": 9}]},
            422,
            "tasks[0].priority: Input should be less than or equal to 4",
        ),
        (
            "/v1/feedback",
            {"event_id": "missing", "reaction": "done"},
            404,
            "not one tipgraph issued",
        ),
        ("/v1/feedback", {"event_id": "e", "reaction": "meh"}, 422, "reaction: Input should be"),
    ],
)
def test_bad_input_gets_a_clear_4xx(
    serve_apps: dict[str, App], path: str, body: dict[str, Any], status: int, message: str
) -> None:
    response = serve_apps["main"].client.post(path, json=body)
    assert response.status_code == status
    assert message in response.json()["detail"]


def _raw(text: str) -> tuple[bytes, dict[str, str]]:
    return text.encode(), {"content-type": "application/json"}


NAMED_BAD_INPUT = {
    "NaN in feedback value": (
        "/v1/feedback",
        '{"event_id": "' + "a" * 32 + '", "reaction": "done", "value": NaN}',
        422,
        "value",
    ),
    "Infinity in a priority": (
        "/v1/tips",
        '{"user_id": "u", "tasks": [{"id": "a", "content": "x", "priority": Infinity}]}',
        422,
        "priority",
    ),
    "a string where a list goes": ("/v1/tips", '{"user_id": "u", "tasks": "t1"}', 422, "tasks"),
    "unknown reaction": (
        "/v1/feedback",
        '{"event_id": "' + "a" * 32 + '", "reaction": "love"}',
        422,
        "reaction",
    ),
    "invalid timezone": (
        "/v1/tips",
        json.dumps(tip_body(timezone="Mars/Olympus_Mons")),
        422,
        "timezone",
    ),
    "a date out of range": (
        "/v1/tips",
        json.dumps(tip_body(now="9999-12-31T23:59:59+00:00")),
        422,
        "now",
    ),
    "an empty task list": ("/v1/tips", '{"user_id": "u", "tasks": []}', 422, "tasks"),
    "10,000 tasks": (
        "/v1/tips",
        json.dumps(
            {"user_id": "u", "tasks": [{"id": f"t{i}", "content": "x"} for i in range(10_000)]}
        ),
        422,
        "tasks",
    ),
    "control characters in content": (
        "/v1/tips",
        json.dumps({"user_id": "u", "tasks": [{"id": "a", "content": "pay\u0000rent"}]}),
        422,
        "content",
    ),
    "reward value out of range": (
        "/v1/feedback",
        '{"event_id": "' + "a" * 32 + '", "reaction": "done", "value": 7}',
        422,
        "value",
    ),
}


@pytest.mark.parametrize("name", sorted(NAMED_BAD_INPUT))
def test_named_bad_input_gets_a_clear_4xx(serve_apps: dict[str, App], name: str) -> None:
    path, text, status, field = NAMED_BAD_INPUT[name]
    content, headers = _raw(text)
    response = serve_apps["main"].client.post(path, content=content, headers=headers)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert field in detail and "Traceback" not in detail


def test_unicode_content_is_served(serve_apps: dict[str, App]) -> None:
    body = tip_body(
        tasks=[
            {"id": "ü", "content": "Řešit daně 📄 — 東京の会議", "priority": 4},
            {"id": "t2", "content": "emoji only 🎉🎉", "priority": 1},
        ]
    )
    response = serve_apps["main"].client.post("/v1/tips", json=body)
    assert response.status_code == 200, response.text


def test_a_10_mb_body_is_refused_before_parsing(serve_apps: dict[str, App]) -> None:
    response = serve_apps["main"].client.post(
        "/v1/tips", content=b"[" + b"1," * 5_000_000 + b"1]", headers=_raw("")[1]
    )
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_a_chunked_10_mb_body_is_refused_without_being_read_whole(
    serve_apps: dict[str, App],
) -> None:
    """No Content-Length to trust: the limit must count bytes as they arrive.  Only a
    little past the limit is ever sent, so a server that waits for the whole body never
    answers and the read below times out."""
    url = httpx.URL(str(serve_apps["main"].client.base_url))
    chunk = b"1," * 32_768
    with socket.create_connection((url.host, url.port), timeout=20) as conn:
        head = (
            f"POST {url.path.rstrip('/')}/v1/tips HTTP/1.1\r\nHost: {url.host}\r\n"
            f"Authorization: {AUTH_HEADERS['Authorization']}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        conn.sendall(head.encode())
        sent = 0
        with contextlib.suppress(OSError):  # the server may close once it has refused
            while sent < 1_300_000:  # the limit is 1,000,000; the body would be 10 MB
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        answer = b""
        with contextlib.suppress(OSError):
            while b"limit is" not in answer and (part := conn.recv(65_536)):
                answer += part  # the headers and the body may come in separate reads
    text = answer.decode("latin-1")
    assert text.startswith("HTTP/1.1 413"), text[:200]
    assert "limit is 1000000" in text


def test_malformed_json_and_oversized_body(serve_apps: dict[str, App]) -> None:
    client = serve_apps["main"].client
    broken = client.post(
        "/v1/tips", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422 and "JSON" in broken.json()["detail"]
    huge = client.post(
        "/v1/tips", content=b"x" * 2_000_000, headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413 and "limit is 1000000" in huge.json()["detail"]


def test_failing_and_slow_shadows_change_neither_response_nor_latency(
    serve_apps: dict[str, App],
) -> None:
    main, faulty = serve_apps["main"], serve_apps["faulty"]
    # The faulty app never gets feedback, so its served policy is untrained: it must rank
    # exactly like an in-process graph with the same policy and no shadows at all.
    body = tip_body(user_id="shadow-check")
    answer = faulty.client.post("/v1/tips", json=body)
    assert answer.status_code == 200, answer.text
    served = [(r["candidate_id"], r["probability"]) for r in answer.json()["ranking"]]
    reference = asyncio.run(_reference_ranking(faulty.settings, body))
    assert [c for c, _ in served] == [c for c, _ in reference]
    assert [p for _, p in served] == pytest.approx([p for _, p in reference], abs=1e-12)

    timings: dict[str, list[float]] = {"main": [], "faulty": []}
    last_event = ""
    for _ in range(15):
        for name, app in (("main", main), ("faulty", faulty)):
            start = time.perf_counter()
            answer = app.client.post("/v1/tips", json=body)
            timings[name].append(time.perf_counter() - start)
            assert answer.status_code == 200
            last_event = answer.json()["event_id"] if name == "faulty" else last_event
    # The slow shadow sleeps 3 s: had it been awaited, every faulty request would take 3 s.
    assert max(timings["faulty"]) < SHADOW_DELAY_S / 2
    assert statistics.median(timings["faulty"]) < statistics.median(timings["main"]) + 0.1

    # Both shadows were still called and logged: the slow one late, the broken one as error.
    _wait_for(
        lambda: len(faulty.query("SELECT 1 FROM policy_runs WHERE event_id = %s", last_event)) == 2,
        timeout_s=20,
    )
    runs = {
        name: (error, latency)
        for name, error, latency in faulty.query(
            "SELECT policy_name, error, latency_ms FROM policy_runs WHERE event_id = %s", last_event
        )
    }
    assert runs["slow"][0] is None and runs["slow"][1] >= SHADOW_DELAY_S * 1000 * 0.9
    assert "injected fault" in runs["broken"][0]


async def _reference_ranking(
    settings: TipgraphSettings, body: dict[str, Any]
) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        alone = settings.model_copy(
            update={"shadows": [], "store": StoreSettings(url=f"sqlite:///{tmp}/ref.db")}
        )
        with open_store(alone.store) as store:
            service = local_service(alone, store)
            response = await service.tip(TipRequest.model_validate(body))
            await service.close()
    return [(r.candidate_id, r.probability) for r in response.ranking]


def test_simulator_drives_the_graph(serve_apps: dict[str, App]) -> None:
    url = str(serve_apps["main"].client.base_url)
    assert (
        cli_main(
            [
                "simulate",
                "--url",
                url,
                "--users",
                "5",
                "--decisions",
                "40",
                "--block",
                "20",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    (count,) = serve_apps["main"].query("SELECT count(*) FROM feedback")
    assert count[0] >= 40


def test_serve_config_file_is_a_valid_serve_config_that_builds() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (application,) = schema.applications
    assert application.import_path == "graphs.tipgraph:build_app"
    app = build_app(application.args)
    assert type(app).__name__ == "Application"


def test_clean_shutdown_writes_every_buffered_decision(
    serve_apps: dict[str, App], postgres_url: str
) -> None:
    from ray import serve

    main = serve_apps["main"]
    schema = f"e2e_flush_{uuid.uuid4().hex[:10]}"
    # The writer would wait a minute before writing: only the shutdown flush can land rows.
    settings = main.settings.model_copy(
        update={
            "serve": main.settings.serve.model_copy(
                update={"app_name": "flush", "route_prefix": "/flush"}
            ),
            "store": StoreSettings(
                url=postgres_url, pg_schema=schema, flush_interval_s=60, batch_size=10_000
            ),
            "shadows": [],
        }
    )
    serve.run(build_graph(settings), name="flush", route_prefix="/flush")
    app = App("flush", str(main.client.base_url).replace("/main", "/flush"), settings, postgres_url)
    try:
        served = set()
        for i in range(20):
            answer = app.client.post("/v1/tips", json=tip_body(user_id=f"flush-{i}"))
            assert answer.status_code == 200, answer.text
            served.add(answer.json()["event_id"])
        assert app.query("SELECT count(*) FROM decisions") == [(0,)]  # still buffered
        serve.delete("flush")  # graceful: the ingress replica's destructor drains the log
        logged = {row[0] for row in app.query("SELECT event_id FROM decisions")}
        assert logged == served
    finally:
        app.client.close()
        drop_schemas(postgres_url, [schema])


def _readme_curl_block() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    after_marker = readme.split("<!-- readme-curl-examples", 1)[1]
    return after_marker.split("```bash\n", 1)[1].split("```", 1)[0]


def run_readme_curl_examples(
    base_url: str, tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The README's curl block, as written, against ``base_url``; the tip lands in
    ``tmp_path / "tip.json"``."""
    script = _readme_curl_block().replace("http://127.0.0.1:8000", base_url.rstrip("/"))
    script = script.replace("/tmp/tip.json", str(tmp_path / "tip.json"))
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result


def test_readme_curl_examples_work(serve_apps: dict[str, App], tmp_path: Path) -> None:
    app = serve_apps["main"]
    result = run_readme_curl_examples(str(app.client.base_url), tmp_path)
    tip = json.loads((tmp_path / "tip.json").read_text())
    assert tip["tip"]["task_id"] in {"t1", "t2", "t3", "t4", None}
    assert '"reaction":"done"' in result.stdout and '"status":"ready"' in result.stdout
    assert app.query("SELECT reaction FROM feedback WHERE event_id = %s", tip["event_id"]) == [
        ("done",)
    ]


SYNC_S = 0.5


def _two_scoring_replicas(main: App, postgres_url: str, name: str, *, shadow: bool) -> App:
    """An app of its own (own schema) whose scoring (and egreedy shadow) runs 2 replicas."""
    from ray import serve

    from tipgraph.settings import DeploymentSettings, LearningSettings, ShadowSettings

    two = DeploymentSettings(num_cpus=0.1, autoscaling={"min_replicas": 2, "max_replicas": 2})
    shadows = [ShadowSettings(policy={"name": "egreedy", "kind": "egreedy"})]
    settings = main.settings.model_copy(
        update={
            "serve": main.settings.serve.model_copy(
                update={"app_name": name, "route_prefix": f"/{name}"}
            ),
            "store": StoreSettings(
                url=postgres_url, pg_schema=f"e2e_{name}_{uuid.uuid4().hex[:10]}"
            ),
            "learning": LearningSettings(sync_interval_s=SYNC_S),
            "deployments": {**main.settings.deployments, "scoring": two, "shadows": two},
            "shadows": shadows if shadow else [],
        }
    )
    serve.run(build_graph(settings), name=name, route_prefix=f"/{name}")
    return App(name, str(main.client.base_url).replace("/main", f"/{name}"), settings, postgres_url)


def test_every_replica_holds_the_model_trained_on_all_feedback(
    serve_apps: dict[str, App], postgres_url: str
) -> None:
    from ray import serve

    from tipgraph.features import FEATURE_SPEC
    from tipgraph.policies import make_policy

    app = _two_scoring_replicas(serve_apps["main"], postgres_url, "replicas", shadow=True)
    settings, sync_s = app.settings, SYNC_S
    try:
        for i in range(40):
            tip = app.client.post("/v1/tips", json=tip_body(user_id=f"replica-{i % 7}"))
            assert tip.status_code == 200, tip.text
            reaction = ("done", "snooze", "dismiss")[i % 3]
            answer = post_feedback(app, tip.json()["event_id"], reaction)
            assert answer.get("learned") is True or answer["status"] == "pending"

        with open_store(settings.store) as store:
            events = store.training_events()
        assert len(events) == 40
        time.sleep(3 * sync_s)  # one sync interval (with margin) after the last feedback

        shadow = settings.shadows[0].policy
        for deployment, policy_settings, args in (
            ("scoring", settings.policy, ()),
            ("shadows", shadow, (shadow.name,)),
        ):
            truth = make_policy(
                policy_settings, FEATURE_SPEC.dim, spec_version=FEATURE_SPEC.version
            )
            for event in events:
                truth.update(event.features, event.reward)
            handle = serve.get_deployment_handle(deployment, app_name="replicas")
            snapshots = handle.broadcast("snapshot", *args).results(timeout_s=30)
            assert len(snapshots) == 2, f"{deployment} should run 2 replicas"
            for snapshot in snapshots:
                assert snapshot["n_updates"] == 40
                np.testing.assert_allclose(snapshot["gram"], truth.stats_.gram_, atol=1e-9)
                np.testing.assert_allclose(snapshot["b"], truth.stats_.b_, atol=1e-9)
            for snapshot in snapshots:
                # Each reward applied exactly once per replica, directly or by the sync
                # (a routed learn may arrive after the sync already applied it).
                assert snapshot["learned_directly"] + snapshot["learned_by_sync"] == 40
            # The router really split the feedback, so the sync did real work.
            assert all(s["learned_directly"] > 0 for s in snapshots), deployment
    finally:
        serve.delete("replicas")
        app.client.close()
        drop_schemas(postgres_url, [str(settings.store.pg_schema)])


PROMOTION_DECISIONS = 1200
"""Decisions the documented path simulates: enough for a learning policy's lower bound to
clear a uniform served policy by ~0.06 (measured on simulator logs of 1,000 events)."""


def _tuning_yaml(path: Path, tune_dir: Path, kinds: list[str], samples: int) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "log": {"source": "store"},
                "search": "random",
                "num_samples": samples,
                "seed": 2,
                "space": {"kinds": kinds},
                "storage_path": str(tune_dir),
            }
        ),
        encoding="utf-8",
    )
    return str(path)


def test_the_documented_promotion_path_under_load(
    serve_apps: dict[str, App],
    postgres_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """docs/tuning.md, as an ML engineer runs it against a live graph: simulate -> tune ->
    promote refused (the challenger is no better than what serves) -> tune -> promote
    accepted -> serving switches to the new version under load, no request failing."""
    import threading

    from ray import serve

    from tipgraph.registry import PolicyRegistry

    main = serve_apps["main"]
    schema = f"e2e_promotion_{uuid.uuid4().hex[:10]}"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "tipgraph.yaml"
    # A uniform served policy: the log is cleanly randomised and any learner beats it.
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"url": postgres_url, "pg_schema": schema},
                "registry": {
                    "tracking_uri": tracking_uri,
                    "serve_alias": "champion",
                    "check_interval_s": 0.5,
                },
                "policy": {"name": "uniform", "kind": "uniform"},
                "shadows": [],
            }
        ),
        encoding="utf-8",
    )
    file_settings = load_settings(config)
    settings = main.settings.model_copy(
        update={
            "serve": main.settings.serve.model_copy(
                update={"app_name": "promotion", "route_prefix": "/promotion"}
            ),
            "store": file_settings.store,
            "registry": file_settings.registry,
            "policy": file_settings.policy,
            "shadows": [],
        }
    )
    serve.run(build_graph(settings), name="promotion", route_prefix="/promotion")
    url = str(main.client.base_url).replace("/main", "/promotion")
    app = App("promotion", url, settings, postgres_url)
    tipgraph = ["--config", str(config)]
    registry = PolicyRegistry(tracking_uri)
    versions: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=url, timeout=30, headers=AUTH_HEADERS) as client:
            while not stop.is_set():
                response = client.post("/v1/tips", json=tip_body(user_id="load"))
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    versions.append(response.json()["policy"]["version"])

    loader = threading.Thread(target=load)
    try:
        simulate = ["simulate", "--url", url, "--users", "50", "--seed", "11"]
        simulate += ["--decisions", str(PROMOTION_DECISIONS), "--block", "600", "--no-progress"]
        assert cli_main([*tipgraph, *simulate]) == 0
        # Feedback right behind its tip may be held until the decision is written.
        _wait_for(lambda: app.client.get("/readyz").json()["feedback_held"] == 0, 60)
        _wait_for(lambda: app.client.get("/readyz").json()["decision_log_backlog"] == 0, 60)
        capsys.readouterr()

        first = _tuning_yaml(tmp_path / "t1.yaml", tmp_path / "tune", ["uniform"], 1)
        assert cli_main([*tipgraph, "tune", "--config", first, "--no-progress"]) == 0
        assert "`tipgraph promote` will refuse it" in capsys.readouterr().out
        record = registry.describe("1")
        assert record.evidence is not None and record.baseline is not None
        assert record.baseline.name == "served policy uniform (uniform)"
        assert record.lineage is not None and record.lineage.n_events >= PROMOTION_DECISIONS
        assert cli_main([*tipgraph, "promote", "--who", "e2e"]) == 1
        refused = capsys.readouterr().err
        assert f"lower bound {record.evidence.lower:.4f} does not beat" in refused
        assert f"{record.baseline.evidence.value:.4f}, the estimate of served policy" in refused
        assert registry.version_of("champion") is None

        loader.start()
        second = _tuning_yaml(tmp_path / "t2.yaml", tmp_path / "tune", ["egreedy", "squarecb"], 2)
        assert cli_main([*tipgraph, "tune", "--config", second, "--no-progress"]) == 0
        assert "`tipgraph promote` will move @champion to it" in capsys.readouterr().out
        assert cli_main([*tipgraph, "promote", "--who", "e2e"]) == 0
        assert "-> version 2: challenger version 2 lower bound" in capsys.readouterr().out
        _wait_for(lambda: bool(versions) and versions[-1].startswith("tip-policy/2+"), 30)
        time.sleep(0.5)
    finally:
        stop.set()
        if loader.is_alive():
            loader.join(30)
        serve.delete("promotion")
        app.client.close()
        drop_schemas(postgres_url, [schema])
    assert failures == []
    assert versions[0].startswith("uniform-")  # the configured policy before any champion
    switched = [v.startswith("tip-policy/2+") for v in versions]
    assert switched[-1] and not switched[0]
    assert switched == sorted(switched), "once switched, every later decision uses the champion"


# -- schemathesis: generated requests against the live OpenAPI, never a 5xx ------------------
SCHEMATHESIS_CASES = 40
"""Generated cases per operation and mode (positive, negative): bounded, so the suite stays
fast.  Driven from one test (schemathesis' own pytest loader does not run on pytest 9)."""


def test_generated_requests_never_get_a_5xx(serve_apps: dict[str, App]) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error

    base_url = str(serve_apps["main"].client.base_url).rstrip("/")
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    sent: dict[tuple[str, str], int] = {}
    statuses: dict[int, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=SCHEMATHESIS_CASES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call_and_validate(
                    base_url=base_url, headers=AUTH_HEADERS, checks=[not_a_server_error]
                )
                key = (case.operation.label, case.meta.generation.mode.value if case.meta else "")
                sent[key] = sent.get(key, 0) + 1
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

            try:
                run()
            except Unsatisfiable:
                # An operation without inputs (GET /healthz) has no invalid request to make.
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    labels = {label for label, _ in sent}
    assert {"POST /v1/tips", "POST /v1/feedback", "DELETE /v1/users/{user_id}"} <= labels
    assert not any(status >= 500 for status in statuses)
    print(f"schemathesis: {sum(sent.values())} cases over {len(labels)} operations: {statuses}")


# -- bounded load: fixed count, fixed concurrency, stops by itself -----------------------------
LOAD_TIPS = 300
LOAD_CONCURRENCY = 8


def test_bounded_load_has_no_errors_and_loses_no_decision(serve_apps: dict[str, App]) -> None:
    app = serve_apps["main"]
    base_url = str(app.client.base_url)
    latencies: list[float] = []
    errors: list[str] = []
    served: list[str] = []
    accepted: list[str] = []
    remaining = iter(range(LOAD_TIPS))

    async def worker(client: httpx.AsyncClient) -> None:
        for n in remaining:
            started = time.perf_counter()
            tip = await client.post("/v1/tips", json=tip_body(user_id=f"load-{n % 40}"))
            latencies.append(time.perf_counter() - started)
            if tip.status_code != 200:
                errors.append(f"tip {tip.status_code}: {tip.text[:200]}")
                continue
            event_id = tip.json()["event_id"]
            served.append(event_id)
            if n % 2 == 0:
                answer = await client.post(
                    "/v1/feedback",
                    json={"event_id": event_id, "reaction": ("done", "dismiss")[n % 4 // 2]},
                )
                if answer.status_code in (200, 202):
                    accepted.append(event_id)
                else:
                    errors.append(f"feedback {answer.status_code}: {answer.text[:200]}")

    async def load() -> float:
        started = time.perf_counter()
        limits = httpx.Limits(max_connections=LOAD_CONCURRENCY)
        async with httpx.AsyncClient(
            base_url=base_url, headers=AUTH_HEADERS, timeout=60, limits=limits
        ) as client:
            await asyncio.gather(*(worker(client) for _ in range(LOAD_CONCURRENCY)))
        return time.perf_counter() - started

    elapsed = asyncio.run(load())
    assert errors == []
    _wait_for(lambda: app.client.get("/readyz").json()["decision_log_backlog"] == 0, 60)
    _wait_for(lambda: app.client.get("/readyz").json()["feedback_held"] == 0, 60)
    logged = app.query("SELECT COUNT(*) FROM decisions WHERE event_id = ANY(%s)", served)
    feedback = app.query("SELECT COUNT(*) FROM feedback WHERE event_id = ANY(%s)", accepted)
    assert len(served) == LOAD_TIPS and logged == [(LOAD_TIPS,)]
    assert feedback == [(len(accepted),)]
    # Batched hops: concurrent requests shared remote calls, and every shadow still logged
    # one row per decision.
    batch_sizes = app.client.get("/readyz").json()["mean_batch_size"]
    assert batch_sizes["context"] > 1 and batch_sizes["scoring"] > 1, batch_sizes
    _wait_for(
        lambda: (
            app.query(
                "SELECT COUNT(*) FROM policy_runs WHERE role = 'shadow' AND event_id = ANY(%s)",
                served,
            )
            == [(LOAD_TIPS * len(app.settings.shadows),)]
        ),
        60,
    )
    q = statistics.quantiles(latencies, n=100)
    print(
        f"load: {LOAD_TIPS} tips + {len(accepted)} feedback at concurrency {LOAD_CONCURRENCY} "
        f"in {elapsed:.1f} s ({LOAD_TIPS / elapsed:.1f} tips/s); tip latency p50 "
        f"{q[49] * 1000:.0f} ms, p95 {q[94] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms; "
        f"0 errors; {logged[0][0]} decisions logged, {feedback[0][0]} feedback rows; "
        f"mean requests per remote call {batch_sizes}"
    )


def test_a_killed_scoring_replica_is_replaced_and_rebuilt_from_the_store(
    serve_apps: dict[str, App], postgres_url: str
) -> None:
    import threading

    import ray
    from ray import serve

    app = _two_scoring_replicas(serve_apps["main"], postgres_url, "kill", shadow=False)
    settings, sync_s = app.settings, SYNC_S
    concurrency = 4
    ok: list[float] = []
    failed: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=str(app.client.base_url), timeout=60, headers=AUTH_HEADERS) as c:
            n = 0
            while not stop.is_set():
                n += 1
                tip = c.post("/v1/tips", json=tip_body(user_id=f"kill-{worker}-{n % 5}"))
                if tip.status_code != 200:
                    failed.append(f"{tip.status_code} {tip.text[:120]}")
                    continue
                ok.append(time.monotonic())
                c.post(
                    "/v1/feedback", json={"event_id": tip.json()["event_id"], "reaction": "done"}
                )

    threads = [threading.Thread(target=load, args=(w,)) for w in range(concurrency)]
    try:
        for thread in threads:
            thread.start()
        _wait_for(lambda: len(ok) >= 40, 60)
        replicas = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::kill#scoring#")
        ]
        assert len(replicas) == 2
        victim = replicas[0]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        killed_at = time.monotonic()

        def replaced() -> bool:
            names = {
                a["name"]
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::kill#scoring#")
            }
            return len(names) == 2 and victim["name"] not in names

        _wait_for(replaced, 120)
        replaced_after = time.monotonic() - killed_at
        served_before = len(ok)
        _wait_for(lambda: len(ok) >= served_before + 40, 120)  # the new replica serves too
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    try:

        def settled() -> bool:
            ready = app.client.get("/readyz").json()
            return ready["decision_log_backlog"] == 0 and ready["feedback_held"] == 0

        _wait_for(settled, 60)
        handle = serve.get_deployment_handle("scoring", app_name="kill")
        seen: list[int] = []
        logged: list[int] = []

        def snapshots() -> list[int]:
            return [s["n_updates"] for s in handle.broadcast("snapshot").results(timeout_s=30)]

        # A fresh handle learns the replica set asynchronously: ask until it has both.
        _wait_for(lambda: len(snapshots()) == 2, 30)

        def both_replicas_hold_every_logged_reward() -> bool:
            # The log first, then the replicas: a reward logged in between (feedback another
            # ingress replica still held) shows as a replica ahead, and the next poll agrees.
            with open_store(settings.store) as store:
                logged[:] = [len(store.training_events())]
            seen[:] = snapshots()
            return seen == logged * 2

        try:
            # Both replicas, the new one included, hold every logged reward within the three
            # sync intervals the test always gave them.
            _wait_for(both_replicas_hold_every_logged_reward, 3 * sync_s)
        except AssertionError:
            raise AssertionError(f"replicas hold {seen} rewards, the log {logged}") from None
        rewards = logged[0]
        assert len(failed) <= concurrency, failed  # at most the requests in flight
        print(
            f"replica kill: {len(ok)} tips served, {len(failed)} failed "
            f"(<= {concurrency} in flight); replaced in {replaced_after:.1f} s; "
            f"both replicas at {rewards} rewards after one sync interval ({sync_s} s)"
        )
    finally:
        serve.delete("kill")
        app.client.close()
        drop_schemas(postgres_url, [str(settings.store.pg_schema)])


def test_status_reports_the_running_graph_the_champion_and_the_backlog(
    serve_apps: dict[str, App], tmp_path: Path
) -> None:
    import ray

    from tests.test_registry import evidence, trained
    from tipgraph.registry import PolicyRegistry

    app = serve_apps["main"]
    for _ in range(3):
        assert app.client.post("/v1/tips", json=tip_body()).status_code == 200
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = PolicyRegistry(tracking_uri)
    version = registry.register(trained("linucb", 0), evidence(0.8))
    registry.promote(force=True)
    config = tmp_path / "status.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": app.settings.store.model_dump(mode="json"),
                "registry": {"tracking_uri": tracking_uri, "serve_alias": "champion"},
            }
        )
    )

    def status(url: str) -> subprocess.CompletedProcess[str]:
        address = ray.get_runtime_context().gcs_address
        command = ["status", "--format", "json", "--url", url, "--ray-address", address]
        return subprocess.run(
            [sys.executable, "-m", "tipgraph_ops.cli", "--config", str(config), *command],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )

    done = status(str(app.client.base_url))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    apps = {entry["name"]: entry for entry in report["serve"]["data"]["apps"]}
    assert apps["main"]["status"] == "RUNNING" and apps["faulty"]["status"] == "RUNNING"
    deployments = {entry["name"]: entry for entry in apps["main"]["deployments"]}
    expected = {"ingress", "context", "generation", "scoring", "shadows"}
    assert deployments.keys() == expected
    assert all(entry["replicas"].get("RUNNING", 0) >= 1 for entry in deployments.values())
    assert report["registry"]["data"]["champion"] == version
    log = report["decision_log"]["data"]
    assert isinstance(log["decision_log_backlog"], int) and log["decision_log_spilled"] == 0
    assert log["stored"]["decisions"] >= 3
    assert report["healthy"] is True

    down = status("http://127.0.0.1:9/nowhere")
    assert down.returncode == 1
    assert "ingress unreachable at http://127.0.0.1:9/nowhere/readyz" in down.stdout
