"""The Ollama stub itself, and facts about LiteLLM 1.110.2's ``ollama_chat/`` provider and Router.

Every LiteLLM test here drives the real client against ``tests.ollama_stub.OllamaStub`` over
real HTTP; nothing is mocked except, in two tests, the Router's retry *sleep* (so that the
default backoff does not cost ~5 s per test; the number of attempts is unchanged).
"""

from __future__ import annotations

import os

# Must be set before litellm is imported anywhere, or it tries to download its price map.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import asyncio
import json
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import litellm
import openai
import pytest
from litellm.router_python_host import PythonHost

from tests.ollama_stub import KINDS, OllamaStub, ollama_stub_fixture  # noqa: F401
from tipgraph import simulated_tips
from tipgraph.projection import cosine

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "ollama_chat/llama3.2:3b"
MODEL_B = "ollama_chat/qwen2.5:1.5b"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You write short productivity tips as JSON."},
    {"role": "user", "content": "Write exactly 3 tips. Tasks: task_id=t-1 (report), task_id=t-2."},
]


def make_router(api_base: str, **router_kwargs: Any) -> litellm.Router:
    return litellm.Router(
        model_list=[
            {
                "model_name": "tip-generator",
                "litellm_params": {"model": MODEL, "api_base": api_base},
            }
        ],
        **router_kwargs,
    )


async def complete(router: litellm.Router, **kwargs: Any) -> litellm.ModelResponse:
    kwargs.setdefault("timeout", 5)
    response = await router.acompletion(model="tip-generator", messages=MESSAGES, **kwargs)
    assert isinstance(response, litellm.ModelResponse)
    return response


async def raised_by(call: Awaitable[object]) -> BaseException:
    try:
        await call
    except BaseException as exc:
        return exc
    raise AssertionError("expected an exception")


@pytest.fixture
def second_stub() -> Iterator[OllamaStub]:
    stub = OllamaStub().start()
    try:
        yield stub
    finally:
        stub.stop()


@pytest.fixture
def backoff_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the Router's retry backoff instead of sleeping it (attempt counts are unchanged)."""
    sleeps: list[float] = []

    def no_sleep(self: PythonHost, seconds: float) -> Awaitable[None]:
        sleeps.append(seconds)
        return asyncio.sleep(0)

    monkeypatch.setattr(PythonHost, "sleep", no_sleep)
    return sleeps


# ---------------------------------------------------------------------------------------------
# The stub on its own (plain httpx)
# ---------------------------------------------------------------------------------------------


def _chat(stub: OllamaStub, user: str = "n=4 task_id=a1 task_id=b2") -> httpx.Response:
    body = {
        "model": "llama3.2:3b",
        "messages": [{"role": "user", "content": user}],
        "stream": False,
    }
    return httpx.post(f"{stub.url}/api/chat", json=body, timeout=10)


def _tips(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200
    payload = response.json()
    assert payload["done"] is True
    assert payload["message"]["role"] == "assistant"
    assert isinstance(payload["prompt_eval_count"], int)
    assert isinstance(payload["eval_count"], int)
    tips = json.loads(payload["message"]["content"])["tips"]
    assert isinstance(tips, list)
    return tips


def test_good_mode_answers_n_distinct_tips(ollama_stub: OllamaStub) -> None:
    tips = _tips(_chat(ollama_stub, "Give me exactly 8 tips for task_id=a1 and task_id=b2"))
    assert len(tips) == 8
    first = KINDS.index(tips[0]["kind"])  # the prompt picks where the cycle starts
    assert [t["kind"] for t in tips] == [KINDS[(first + i) % len(KINDS)] for i in range(8)]
    assert len({t["content"] for t in tips}) == 8
    assert all(0 < len(t["content"]) < 200 for t in tips)
    assert {t["task_id"] for t in tips} == {"a1", "b2"}
    assert len(_tips(_chat(ollama_stub, "n=2"))) == 2
    no_ids = _tips(_chat(ollama_stub, "some tips please"))
    assert len(no_ids) == 5
    assert all(t["task_id"] is None for t in no_ids)
    assert len(ollama_stub.requests) == 3
    assert ollama_stub.requests[0]["messages"][0]["content"].startswith("Give me exactly 8")


def test_content_override_is_returned_verbatim(ollama_stub: OllamaStub) -> None:
    ollama_stub.content = "plain text, not JSON"
    assert _chat(ollama_stub).json()["message"]["content"] == "plain text, not JSON"


def test_error_malformed_and_partial_modes(ollama_stub: OllamaStub) -> None:
    ollama_stub.mode = "error"
    response = _chat(ollama_stub)
    assert response.status_code == 500
    assert "error" in response.json()

    ollama_stub.mode = "malformed"
    content = _chat(ollama_stub).json()["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(content)

    ollama_stub.mode = "partial"
    items = _tips(_chat(ollama_stub))
    objects = [i for i in items if isinstance(i, dict)]
    assert any(isinstance(i, str) for i in items)
    assert any(o["content"] == "" for o in objects)
    assert any(len(o["content"]) > 2000 for o in objects)
    assert any(o["kind"] not in KINDS for o in objects)
    contents = [o["content"] for o in objects]
    assert len(contents) > len(set(contents))  # a duplicate
    valid = {o["content"] for o in objects if 0 < len(o["content"]) <= 2000 and o["kind"] in KINDS}
    assert len(valid) >= 2


def test_recover_mode_fails_fail_times_then_succeeds(ollama_stub: OllamaStub) -> None:
    ollama_stub.fail_times = 2
    ollama_stub.mode = "recover"
    assert [_chat(ollama_stub).status_code for _ in range(4)] == [500, 500, 200, 200]
    ollama_stub.mode = "recover"  # setting the mode again re-arms the failures
    assert _chat(ollama_stub).status_code == 500


def test_slow_mode_does_not_block_other_requests(ollama_stub: OllamaStub) -> None:
    ollama_stub.delay_s = 1.0
    ollama_stub.mode = "slow"
    slow_status: list[int] = []
    worker = threading.Thread(target=lambda: slow_status.append(_chat(ollama_stub).status_code))
    start = time.monotonic()
    worker.start()
    while not ollama_stub.requests:  # the slow request has arrived and is sleeping
        time.sleep(0.01)
    ollama_stub.mode = "good"
    assert _chat(ollama_stub).status_code == 200
    assert time.monotonic() - start < 0.8
    worker.join()
    assert slow_status == [200]
    assert time.monotonic() - start >= 1.0


def test_model_info_endpoints_and_stop(ollama_stub: OllamaStub) -> None:
    tags = httpx.get(f"{ollama_stub.url}/api/tags", timeout=5).json()
    assert tags["models"][0]["name"] == "llama3.2:3b"
    show = httpx.post(f"{ollama_stub.url}/api/show", json={"name": "llama3.2:3b"}, timeout=5)
    assert show.json()["model_info"]["llama.context_length"] == 131072
    assert ollama_stub.other_requests == [("/api/show", {"name": "llama3.2:3b"})]
    assert ollama_stub.requests == []  # only /api/chat bodies are counted there

    url = ollama_stub.url
    with httpx.Client(timeout=2) as client:  # a keep-alive connection must die with the stub
        assert client.get(f"{url}/api/tags").status_code == 200
        ollama_stub.stop()
        with pytest.raises(httpx.TransportError):
            client.get(f"{url}/api/tags")


# ---------------------------------------------------------------------------------------------
# LiteLLM facts
# ---------------------------------------------------------------------------------------------


async def test_fact1_router_returns_stub_content_and_model_name(ollama_stub: OllamaStub) -> None:
    ollama_stub.content = '{"tips": []}'
    response = await complete(make_router(ollama_stub.url))

    assert response.choices[0].message.content == '{"tips": []}'
    assert response.choices[0].finish_reason == "stop"
    # response.model is the deployment's litellm model string, not the alias, not the bare tag.
    assert response.model == "ollama_chat/llama3.2:3b"
    hidden = response._hidden_params
    assert hidden["custom_llm_provider"] == "ollama_chat"
    assert hidden["api_base"] == ollama_stub.url
    assert hidden["litellm_model_name"] == "ollama_chat/llama3.2:3b"
    assert isinstance(hidden["model_id"], str)  # the deployment id (hash) in the Router
    assert hidden["additional_headers"]["x-litellm-model-group"] == "tip-generator"  # the alias
    assert hidden["additional_headers"]["x-litellm-attempted-retries"] == 0
    assert hidden["additional_headers"]["x-litellm-attempted-fallbacks"] == 0
    # usage comes from prompt_eval_count / eval_count
    usage = response.usage  # type: ignore[attr-defined]
    assert usage.completion_tokens == max(1, len('{"tips": []}') // 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # One POST /api/chat with "stream": false, the bare model tag, messages, and empty options.
    assert len(ollama_stub.requests) == 1
    body = ollama_stub.requests[0]
    assert body["model"] == "llama3.2:3b"
    assert body["stream"] is False
    assert body["options"] == {}
    assert "format" not in body
    assert body["messages"] == [{**m, "images": []} for m in MESSAGES]


async def test_fact2_error_raises_internal_server_error_and_retries_twice_by_default(
    ollama_stub: OllamaStub, backoff_sleeps: list[float]
) -> None:
    ollama_stub.mode = "error"

    exc = await raised_by(complete(make_router(ollama_stub.url)))
    assert type(exc) is litellm.exceptions.InternalServerError
    assert isinstance(exc, litellm.InternalServerError)
    assert isinstance(exc, openai.InternalServerError)  # also an openai.APIStatusError
    assert exc.status_code == 500
    assert exc.llm_provider == "ollama_chat"
    assert exc.model == "ollama_chat/llama3.2:3b"
    assert "stub: model runner has unexpectedly stopped" in str(exc)
    assert len(ollama_stub.requests) == 3  # default: 1 attempt + 2 retries
    # Jittered exponential backoff, one sleep per failed attempt (measured unpatched: a failing
    # call with the defaults takes about 4.5-5.5 s before it raises).
    assert len(backoff_sleeps) == 3
    assert all(0.4 < s < 10 for s in backoff_sleeps)
    assert sum(backoff_sleeps) > 2.0

    # Disabling retries: Router(num_retries=0) or acompletion(..., num_retries=0).
    ollama_stub.requests.clear()
    await raised_by(complete(make_router(ollama_stub.url, num_retries=0)))
    assert len(ollama_stub.requests) == 1
    ollama_stub.requests.clear()
    await raised_by(complete(make_router(ollama_stub.url), num_retries=0))
    assert len(ollama_stub.requests) == 1

    # A retry can rescue a flaky server.
    ollama_stub.requests.clear()
    ollama_stub.fail_times = 2
    ollama_stub.mode = "recover"
    response = await complete(make_router(ollama_stub.url))
    assert len(ollama_stub.requests) == 3
    assert response._hidden_params["additional_headers"]["x-litellm-attempted-retries"] == 2

    # A dead server: APIConnectionError.
    url = ollama_stub.url
    ollama_stub.stop()
    exc = await raised_by(complete(make_router(url, num_retries=0)))
    assert type(exc) is litellm.exceptions.APIConnectionError


async def test_fact3_timeout_cuts_each_attempt(
    ollama_stub: OllamaStub, backoff_sleeps: list[float]
) -> None:
    ollama_stub.mode = "slow"
    ollama_stub.delay_s = 3.0
    router = make_router(ollama_stub.url, num_retries=0)

    start = time.monotonic()
    exc = await raised_by(complete(router, timeout=0.5))
    elapsed = time.monotonic() - start
    assert type(exc) is litellm.exceptions.Timeout
    assert isinstance(exc, openai.APITimeoutError)
    assert not isinstance(exc, TimeoutError)  # not the builtin / asyncio one
    assert exc.status_code == 408
    assert 0.45 < elapsed < 1.5
    assert len(ollama_stub.requests) == 1

    # Router-level timeout works the same way (a per-call timeout overrides it).
    start = time.monotonic()
    router_level = make_router(ollama_stub.url, num_retries=0, timeout=0.3)
    exc = await raised_by(router_level.acompletion(model="tip-generator", messages=MESSAGES))
    assert type(exc) is litellm.exceptions.Timeout
    assert 0.25 < time.monotonic() - start < 1.2

    # The timeout is per attempt: with the default retries a timing-out call makes 3 attempts.
    ollama_stub.requests.clear()
    start = time.monotonic()
    exc = await raised_by(complete(make_router(ollama_stub.url), timeout=0.3))
    assert type(exc) is litellm.exceptions.Timeout
    assert len(ollama_stub.requests) == 3
    assert time.monotonic() - start >= 0.9  # 3 × 0.3 s, the (patched) backoff not counted

    # asyncio.wait_for cancels the call and raises the builtin TimeoutError.
    ollama_stub.requests.clear()
    start = time.monotonic()
    exc = await raised_by(asyncio.wait_for(complete(router, timeout=30), 0.5))
    assert type(exc) is TimeoutError
    assert 0.45 < time.monotonic() - start < 1.0
    assert len(ollama_stub.requests) == 1


async def test_fact4_os_environ_reference_is_resolved(
    ollama_stub: OllamaStub, second_stub: OllamaStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_API_BASE", ollama_stub.url)
    router = make_router("os.environ/OLLAMA_API_BASE")
    # Resolved once, when the Router is built: a later change of the variable is not seen.
    monkeypatch.setenv("OLLAMA_API_BASE", second_stub.url)
    response = await complete(router)
    assert response._hidden_params["api_base"] == ollama_stub.url
    assert len(ollama_stub.requests) == 1
    assert second_stub.requests == []

    # Without any api_base the ollama_chat provider itself reads $OLLAMA_API_BASE per call.
    no_base = litellm.Router(
        model_list=[{"model_name": "tip-generator", "litellm_params": {"model": MODEL}}]
    )
    await complete(no_base, num_retries=0)
    assert len(second_stub.requests) == 1


async def test_fact5_fallback_to_second_model_group(
    ollama_stub: OllamaStub, second_stub: OllamaStub, backoff_sleeps: list[float]
) -> None:
    ollama_stub.mode = "error"
    router = litellm.Router(
        model_list=[
            {
                "model_name": "tip-generator",
                "litellm_params": {"model": MODEL, "api_base": ollama_stub.url},
            },
            {
                "model_name": "tip-generator-b",
                "litellm_params": {"model": MODEL_B, "api_base": second_stub.url},
            },
        ],
        fallbacks=[{"tip-generator": ["tip-generator-b"]}],
    )

    response = await complete(router)
    # The primary is retried first (default 2 retries), then the fallback group is called once.
    assert len(ollama_stub.requests) == 3
    assert len(second_stub.requests) == 1
    assert second_stub.requests[0]["model"] == "qwen2.5:1.5b"
    assert response.model == "ollama_chat/qwen2.5:1.5b"  # the fallback deployment's model
    headers = response._hidden_params["additional_headers"]
    assert headers["x-litellm-model-group"] == "tip-generator-b"
    assert headers["x-litellm-attempted-fallbacks"] == 1
    assert response._hidden_params["api_base"] == second_stub.url

    # num_retries=0: straight to the fallback.
    ollama_stub.requests.clear()
    second_stub.requests.clear()
    await complete(router, num_retries=0)
    assert (len(ollama_stub.requests), len(second_stub.requests)) == (1, 1)

    # A timeout also triggers the fallback.
    ollama_stub.mode = "slow"
    ollama_stub.delay_s = 3.0
    start = time.monotonic()
    response = await complete(router, num_retries=0, timeout=0.3)
    assert response.model == "ollama_chat/qwen2.5:1.5b"
    assert time.monotonic() - start < 1.5

    # Both groups fail: the *primary's* exception is raised, naming the failed fallback.
    ollama_stub.mode = "error"
    second_stub.mode = "error"
    exc = await raised_by(complete(router, num_retries=0))
    assert type(exc) is litellm.exceptions.InternalServerError
    assert "Fallback to tip-generator-b also failed" in str(exc)


async def test_fact6_litellm_exceptions_do_not_unpickle(ollama_stub: OllamaStub) -> None:
    router = make_router(ollama_stub.url, num_retries=0)
    ollama_stub.mode = "error"
    server_error = await raised_by(complete(router))
    ollama_stub.mode = "slow"
    ollama_stub.delay_s = 2.0
    timeout = await raised_by(complete(router, timeout=0.2))
    url = ollama_stub.url
    ollama_stub.stop()
    connection_error = await raised_by(complete(make_router(url, num_retries=0)))
    rate_limit = litellm.exceptions.RateLimitError("slow down", llm_provider="x", model="m")
    bad_request = litellm.exceptions.BadRequestError("bad", model="m", llm_provider="x")

    for exc in (server_error, timeout, connection_error, rate_limit, bad_request):
        data = pickle.dumps(exc)  # dumping works ...
        with pytest.raises(TypeError, match=r"missing .* required positional argument"):
            pickle.loads(data)  # ... loading does not: __init__ needs llm_provider / model


NETWORK_PROBE = r"""
import json, os, sys
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.pop("OLLAMA_API_BASE", None)
events = []

def hook(event, args):
    if event == "socket.connect":
        events.append(["connect", repr(args[1])])
    elif event == "socket.getaddrinfo":
        events.append(["getaddrinfo", repr(args[:2])])

sys.addaudithook(hook)
report = {}
import litellm
report["import"] = list(events)
sys.path.insert(0, os.getcwd())
from tests.ollama_stub import OllamaStub

stub = OllamaStub().start()
events.clear()
litellm.model_cost["ollama_chat/llama3.2:3b"] = {
    "input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
    "litellm_provider": "ollama_chat", "mode": "chat"}
router = litellm.Router(model_list=[{"model_name": "a", "litellm_params": {
    "model": "ollama_chat/llama3.2:3b", "api_base": stub.url}}])
report["router_model_in_cost_map"] = list(events)

events.clear()
litellm.register_model({"ollama_chat/llama3.2:1b": {
    "input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
    "litellm_provider": "ollama_chat", "mode": "chat"}})
report["register_model"] = list(events)

events.clear()
litellm.Router(model_list=[{"model_name": "b", "litellm_params": {
    "model": "ollama_chat/unmapped-model:1b", "api_base": stub.url}}])
report["router_unmapped_model"] = list(events)

events.clear()
os.environ["OLLAMA_API_BASE"] = stub.url
litellm.Router(model_list=[{"model_name": "c", "litellm_params": {
    "model": "ollama_chat/other-unmapped:2b", "api_base": stub.url}}])
report["router_unmapped_with_env"] = list(events)
report["stub_other_requests"] = stub.other_requests

import asyncio
events.clear()
asyncio.run(router.acompletion(model="a", messages=[{"role": "user", "content": "hi"}], timeout=5))
report["call"] = list(events)
report["stub_url"] = stub.url
stub.stop()
print("REPORT=" + json.dumps(report))
"""


FACT8 = "test_fact8_network_access_of_import_router_and_call"


@pytest.fixture(scope="module", autouse=True)
def network_probe(request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str] | None]:
    """Start the fact-8 probe (a fresh interpreter importing litellm, ~6-8 s) as soon as this
    module's first test runs, so that it overlaps with the other tests; only if fact 8 is
    among the selected tests."""
    if not any(item.name == FACT8 for item in request.session.items):
        yield None
        return
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("OLLAMA_API_BASE", None)
    process = subprocess.Popen(
        [sys.executable, "-c", NETWORK_PROBE],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def test_fact8_network_access_of_import_router_and_call(
    network_probe: subprocess.Popen[str] | None,
) -> None:
    assert network_probe is not None
    stdout, stderr = network_probe.communicate(timeout=120)
    assert network_probe.returncode == 0, stderr[-3000:]
    line = next(ln for ln in stdout.splitlines() if ln.startswith("REPORT="))
    report = json.loads(line.removeprefix("REPORT="))
    port = report["stub_url"].rsplit(":", 1)[1]

    # import litellm: no socket at all.
    assert report["import"] == []
    # Router with a model present in litellm.model_cost (plain dict assignment): no socket.
    assert report["router_model_in_cost_map"] == []
    # litellm.register_model() itself looks the unknown ollama model up: POST /api/show to
    # $OLLAMA_API_BASE or http://localhost:11434.
    assert ["connect", "('127.0.0.1', 11434)"] in report["register_model"]
    # Router with an ollama model unknown to the cost map: ONE synchronous POST /api/show to
    # $OLLAMA_API_BASE or http://localhost:11434 -- NOT to the deployment's api_base.
    assert ["getaddrinfo", "('localhost', 11434)"] in report["router_unmapped_model"]
    assert ["connect", "('127.0.0.1', 11434)"] in report["router_unmapped_model"]
    assert all(port not in e[1] for e in report["router_unmapped_model"])
    assert report["router_unmapped_with_env"] == [
        ["getaddrinfo", f"('127.0.0.1', {port})"],
        ["connect", f"('127.0.0.1', {port})"],
    ]
    assert report["stub_other_requests"] == [["/api/show", {"name": "other-unmapped:2b"}]]
    # The completion itself only talks to the deployment's api_base.
    assert report["call"] and all(e[1].endswith(f"{port})") for e in report["call"])


async def test_fact7_response_format_json_object_sends_format_json(
    ollama_stub: OllamaStub,
) -> None:
    router = make_router(ollama_stub.url)
    await complete(
        router,
        response_format={"type": "json_object"},
        temperature=0.2,
        max_tokens=300,
        seed=7,
    )
    body = ollama_stub.requests[-1]
    assert body["format"] == "json"
    assert body["options"] == {"temperature": 0.2, "num_predict": 300, "seed": 7}
    assert body["stream"] is False

    schema = {"type": "object", "properties": {"tips": {"type": "array"}}, "required": ["tips"]}
    await complete(
        router,
        response_format={"type": "json_schema", "json_schema": {"name": "tips", "schema": schema}},
    )
    assert ollama_stub.requests[-1]["format"] == schema  # json_schema: the schema itself


def _post(stub: OllamaStub, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{stub.url}{path}", json=body, timeout=10)


def test_embed_endpoint_answers_bag_of_words_vectors(ollama_stub: OllamaStub) -> None:
    texts = [
        "Block 25 minutes for task 1 now.",
        "Block 25 minutes for task 2 now.",
        "Maybe think about it someday.",
    ]
    answer = _post(ollama_stub, "/api/embed", {"model": "nomic-embed-text", "input": texts})
    assert answer.status_code == 200
    vectors = answer.json()["embeddings"]
    assert len(vectors) == 3 and all(len(v) == simulated_tips.EMBED_DIM for v in vectors)
    similar, different = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert similar > 0.9 > 0.3 > different
    assert ollama_stub.embed_requests[-1]["input"] == texts
    ollama_stub.embed_mode = "error"
    assert _post(ollama_stub, "/api/embed", {"input": texts}).status_code == 500


def test_judge_prompt_gets_a_verdict_per_listed_tip(ollama_stub: OllamaStub) -> None:
    listed = [
        {"index": 0, "tip": "Block 25 minutes and do the first step now.", "task_id": None},
        {"index": 1, "tip": "Skip sleep tonight and push through no matter what.", "task_id": None},
        {"index": 2, "tip": "Maybe think about it someday.", "task_id": None},
    ]
    prompt = "Judge these.\n" + json.dumps(listed) + '\nAnswer {"verdicts": [...]}'
    body = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": prompt}]}
    answer = _post(ollama_stub, "/api/chat", body).json()
    verdicts = json.loads(answer["message"]["content"])["verdicts"]
    assert [v["index"] for v in verdicts] == [0, 1, 2]
    assert [v["safe"] for v in verdicts] == [True, False, True]
    assert verdicts[0]["relevance"] > 0.5 > verdicts[2]["relevance"]
    assert len(ollama_stub.judge_requests) == 1 and not ollama_stub.requests
    # What a stub in another process answered, for the process that started it.
    counts = httpx.get(f"{ollama_stub.url}/stub/counts", timeout=5).json()
    assert counts == {"chat": 0, "judge": 1, "embed": 0}


def test_latency_applies_per_endpoint(ollama_stub: OllamaStub) -> None:
    ollama_stub.latency_s = {"chat": 0.0, "judge": 0.0, "embed": 0.5}
    start = time.perf_counter()
    _post(ollama_stub, "/api/embed", {"input": ["x"]})
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    _chat(ollama_stub, "n=1")
    chat_s = time.perf_counter() - start
    assert embed_s >= 0.5 > chat_s
