"""A local HTTP server that speaks enough of the Ollama API for LiteLLM's ``ollama_chat/`` provider.

LiteLLM 1.110.2 (``litellm/llms/ollama/chat/transformation.py``) sends one
``POST {api_base}/api/chat`` per completion with the body::

    {"model": "llama3.2:3b", "messages": [{"role": ..., "content": ...}, ...],
     "options": {...}, "stream": false, "format": "json"?}

and reads ``message`` (``content``, optional ``thinking``/``tool_calls``), ``done_reason``,
``prompt_eval_count`` and ``eval_count`` from the answer. ``/api/show`` and ``/api/tags``
(model info / model listing) are answered too, so that nothing ever reaches a real Ollama.

All three model aliases are served, with the tips, verdicts and vectors of
:mod:`tipgraph.simulated_tips` (tips with a hidden quality the embedding reveals):

* ``tip-generator``: ``/api/chat``, answered with tips (``mode`` picks faults);
* ``judge``: ``/api/chat`` whose prompt asks for ``"verdicts"``, answered with a verdict
  per listed tip (``judge_mode``: good, error, malformed);
* ``embedder``: ``POST /api/embed`` (``{"model", "input": [texts]}`` ->
  ``{"embeddings": [[...]]}``), bag-of-words vectors (``embed_mode``: good, error).

``latency_s`` adds a delay per endpoint (``chat``, ``judge``, ``embed``) in every mode.

Usage::

    stub = OllamaStub().start()
    stub.mode = "good"            # "good" | "slow" | "error" | "malformed" | "partial" | "recover"
    ...  # point LiteLLM at stub.url
    stub.stop()

or, in a test module, ``from tests.ollama_stub import ollama_stub_fixture  # noqa: F401``
(the fixture's name is ``ollama_stub``; see ``ollama_stub_fixture``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from tipgraph import simulated_tips

MODES = ("good", "slow", "error", "malformed", "partial", "recover")
KINDS = simulated_tips.KINDS
DEFAULT_TIP_COUNT = 5
MAX_TIP_COUNT = 50

_COUNT_PATTERNS = (
    re.compile(r"\bn\s*[=:]\s*(\d+)", re.IGNORECASE),
    re.compile(r"\bexactly\s+(\d+)", re.IGNORECASE),
    re.compile(r"\b(\d+)\s+tips?\b", re.IGNORECASE),
)
# task_id=abc, "task_id": "abc", task_id: 'abc', id=abc (with or without quotes).
_TASK_ID_PATTERN = re.compile(r"""\b(?:task_id|id)["']?\s*[:=]\s*["']?([A-Za-z0-9][\w\-:.]*)""")

AID_MODES = ("good", "error", "malformed")


def _message_text(message: object) -> str:
    """Text of one chat message (content may be a string or a list of parts)."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def requested_tip_count(body: dict[str, Any]) -> int:
    """N from the last user message ("n=3", "exactly 3", "3 tips"), else 5."""
    messages = body.get("messages") or []
    user_texts = [
        _message_text(m) for m in messages if isinstance(m, dict) and m.get("role") == "user"
    ]
    if not user_texts:
        return DEFAULT_TIP_COUNT
    for pattern in _COUNT_PATTERNS:
        match = pattern.search(user_texts[-1])
        if match:
            return max(1, min(int(match.group(1)), MAX_TIP_COUNT))
    return DEFAULT_TIP_COUNT


def requested_task_ids(body: dict[str, Any]) -> list[str]:
    """Task ids mentioned anywhere in the messages, first occurrence order, no duplicates."""
    ids: list[str] = []
    for message in body.get("messages") or []:
        for match in _TASK_ID_PATTERN.finditer(_message_text(message)):
            if match.group(1) not in ids:
                ids.append(match.group(1))
    return ids


def good_tips(body: dict[str, Any]) -> list[dict[str, Any]]:
    """N valid, distinct tips (:func:`tipgraph.simulated_tips.tips`, some vague, a few
    unsafe); kinds cycle through KINDS from a place the prompt picks; task ids cycle
    through the request's."""
    messages = body.get("messages") or []
    prompt = "\n".join(_message_text(m) for m in messages if isinstance(m, dict))
    return simulated_tips.tips(requested_tip_count(body), requested_task_ids(body), prompt)


def is_judge_request(body: dict[str, Any]) -> bool:
    return any('"verdicts"' in _message_text(m) for m in body.get("messages") or [])


def partial_tips(body: dict[str, Any]) -> list[Any]:
    """A list mixing valid tips with broken items; the valid ones are items 0, 3 and 7."""
    task_ids = requested_task_ids(body)
    task_id = task_ids[0] if task_ids else None
    first = {
        "content": "Spend ten focused minutes on your top task.",
        "kind": "focus",
        "task_id": task_id,
    }
    return [
        first,  # valid
        {"content": "", "kind": "batch", "task_id": None},  # empty content
        {**first},  # duplicate of item 0
        {"content": "Plan tomorrow before you log off.", "kind": "plan_day", "task_id": None},
        {"content": "x" * 2500, "kind": "focus", "task_id": None},  # over-long content
        {"content": "Dance it out for a minute.", "kind": "party", "task_id": None},  # bad kind
        "Drink a glass of water.",  # a string, not an object
        {"content": "Group your e-mails into one sweep.", "kind": "batch", "task_id": None},
    ]


class _Handler(BaseHTTPRequestHandler):
    server: _StubHTTPServer
    protocol_version = "HTTP/1.1"
    # Headers and body leave in separate writes: with Nagle's algorithm on, the body waits
    # for the client's delayed ACK, 40 ms per answer that a real Ollama (Go: TCP_NODELAY)
    # never adds.
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output quiet

    # -- plumbing ---------------------------------------------------------------------------

    def _read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return {"_raw": raw.decode("utf-8", "replace")}
        return body if isinstance(body, dict) else {"_raw": body}

    def _send(self, status: int, payload: object, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout); nothing to do

    # -- routes -----------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "":
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/tags":
            self._send(200, {"models": [self.server.stub.model_card()]})
        elif path == "/api/version":
            self._send(200, {"version": "0.6.0"})
        elif path == "/stub/counts":  # not Ollama's: what a stub in another process answered
            self._send(200, self.server.stub.counts())
        else:
            self._send(404, {"error": f"not found: {self.path}"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        body = self._read_json()
        stub = self.server.stub
        stub._record(path, body)
        if path == "/api/chat" and is_judge_request(body):
            status, payload = stub._judge_reply(body)
            self._send(status, payload)
        elif path == "/api/chat":
            status, payload = stub._chat_reply(body)
            if status == 200 and body.get("stream") is True:
                self._send(200, _ndjson_stream(payload), "application/x-ndjson")
            else:
                self._send(status, payload)
        elif path == "/api/embed":
            status, payload = stub._embed_reply(body)
            self._send(status, payload)
        elif path == "/api/show":
            self._send(200, stub.show_info(str(body.get("name") or body.get("model") or "")))
        else:
            self._send(404, {"error": f"not found: {self.path}"})


def _ndjson_stream(final: dict[str, Any]) -> bytes:
    """A two-chunk Ollama stream: the whole content, then an empty "done" chunk."""
    first = {**final, "done": False}
    for key in ("done_reason", "prompt_eval_count", "eval_count", "total_duration"):
        first.pop(key, None)
    last = {**final, "message": {"role": "assistant", "content": ""}}
    return (json.dumps(first) + "\n" + json.dumps(last) + "\n").encode()


class _StubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, stub: OllamaStub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.stub = stub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Cut keep-alive connections too: a stopped stub must look like a dead server."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class OllamaStub:
    """Fake Ollama server; see the module docstring. Attributes may be changed at any time."""

    model_name: ClassVar[str] = "llama3.2:3b"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _StubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._mode = "good"
        self._recover_seen = 0
        self.delay_s: float = 5.0
        self.fail_times: int = 3
        self.content: str | None = None
        self.judge_mode = "good"
        self.embed_mode = "good"
        self.latency_s: dict[str, float] = {"chat": 0.0, "judge": 0.0, "embed": 0.0}
        # JSON bodies of every tip-generator POST /api/chat, in arrival order (one per LLM
        # call, retries included); judge calls go to ``judge_requests``, embedding calls to
        # ``embed_requests``, and the model-info endpoints to ``other_requests``, so that
        # ``len(stub.requests)`` always counts tip generations.
        self.requests: list[dict[str, Any]] = []
        self.judge_requests: list[dict[str, Any]] = []
        self.embed_requests: list[dict[str, Any]] = []
        self.other_requests: list[tuple[str, dict[str, Any]]] = []

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> OllamaStub:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _StubHTTPServer(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ollama-stub-{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes "slow" handlers up
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> OllamaStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("OllamaStub is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"unknown mode {value!r}; expected one of {MODES}")
        with self._lock:
            self._mode = value
            self._recover_seen = 0

    # -- canned answers ---------------------------------------------------------------------

    def model_card(self) -> dict[str, Any]:
        return {
            "name": self.model_name,
            "model": self.model_name,
            "modified_at": "2025-01-01T00:00:00Z",
            "size": 2019393189,
            "digest": "0" * 64,
            "details": {
                "family": "llama",
                "parameter_size": "3.2B",
                "quantization_level": "Q4_K_M",
            },
        }

    def show_info(self, name: str) -> dict[str, Any]:
        return {
            "modelfile": f"FROM {name or self.model_name}",
            "template": "{{ if .Tools }}tools{{ end }}{{ .Prompt }}",
            "details": self.model_card()["details"],
            "model_info": {"general.architecture": "llama", "llama.context_length": 131072},
        }

    def counts(self) -> dict[str, int]:
        """Calls answered so far, by endpoint (``GET /stub/counts`` serves it)."""
        with self._lock:
            return {
                "chat": len(self.requests),
                "judge": len(self.judge_requests),
                "embed": len(self.embed_requests),
            }

    def _record(self, path: str, body: dict[str, Any]) -> None:
        with self._lock:
            if path == "/api/chat" and is_judge_request(body):
                self.judge_requests.append(body)
            elif path == "/api/chat":
                self.requests.append(body)
            elif path == "/api/embed":
                self.embed_requests.append(body)
            else:
                self.other_requests.append((path, body))

    def _effective_mode(self) -> str:
        with self._lock:
            if self._mode != "recover":
                return self._mode
            self._recover_seen += 1
            return "error" if self._recover_seen <= self.fail_times else "good"

    def _wait(self, endpoint: str) -> None:
        delay = self.latency_s.get(endpoint, 0.0)
        if delay > 0:
            self._stopping.wait(delay)

    def _judge_reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._wait("judge")
        if self.judge_mode == "error":
            return 500, {"error": "stub: judge model runner has unexpectedly stopped"}
        prompt = "\n".join(_message_text(m) for m in body.get("messages") or [])
        text = (
            "I think they are fine."
            if self.judge_mode == "malformed"
            else (simulated_tips.judge_answer(prompt))
        )
        return 200, self._chat_payload(body, text)

    def _embed_reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._wait("embed")
        if self.embed_mode != "good":
            return 500, {"error": "stub: embedding model runner has unexpectedly stopped"}
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        return 200, {
            "model": str(body.get("model") or "nomic-embed-text"),
            "embeddings": [simulated_tips.embed(str(t)) for t in texts],
            "prompt_eval_count": sum(len(str(t)) // 4 + 1 for t in texts),
        }

    def _chat_reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self._wait("chat")
        mode = self._effective_mode()
        if mode == "error":
            return 500, {"error": "stub: model runner has unexpectedly stopped"}
        if mode == "slow":
            self._stopping.wait(self.delay_s)
        if mode == "malformed":
            text = "Sure! Here are some tips: 1) Drink water. 2) Take a walk. 3) Sleep more."
        elif mode == "partial":
            text = json.dumps({"tips": partial_tips(body)})
        elif self.content is not None:
            text = self.content
        else:
            text = json.dumps({"tips": good_tips(body)})
        return 200, self._chat_payload(body, text)

    def _chat_payload(self, body: dict[str, Any], text: str) -> dict[str, Any]:
        prompt_chars = sum(len(_message_text(m)) for m in body.get("messages") or [])
        return {
            "model": str(body.get("model") or self.model_name),
            "created_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "message": {"role": "assistant", "content": text},
            "done_reason": "stop",
            "done": True,
            "total_duration": 1_000_000,
            "load_duration": 100_000,
            "prompt_eval_count": max(1, prompt_chars // 4),
            "prompt_eval_duration": 200_000,
            "eval_count": max(1, len(text) // 4),
            "eval_duration": 700_000,
        }


ALIASES = (
    ("tip-generator", "ollama_chat/llama3.2:3b"),
    ("judge", "ollama_chat/llama3.2:3b"),
    ("embedder", "ollama/nomic-embed-text"),
)


def write_llm_config(path: Path, stub: OllamaStub) -> Path:
    """A configs/llm.yaml with the three aliases served by ``stub``, no retries."""
    entries = [
        {"model_name": name, "litellm_params": {"model": model, "api_base": stub.url}}
        for name, model in ALIASES
    ]
    path.write_text(yaml.safe_dump({"model_list": entries, "router_settings": {"num_retries": 0}}))
    return path


def wait_for_requests(stub: OllamaStub, count: int, timeout_s: float = 5.0) -> None:
    """Block until the stub has seen ``count`` chat requests (for background callers)."""
    deadline = time.monotonic() + timeout_s
    while len(stub.requests) < count and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(name="ollama_stub")
def ollama_stub_fixture() -> Iterator[OllamaStub]:
    """A started OllamaStub in mode "good"; stopped after the test.

    The fixture is called ``ollama_stub``. Import it as ``ollama_stub_fixture`` to keep ruff
    quiet (``from tests.ollama_stub import ollama_stub_fixture  # noqa: F401``): importing the
    name ``ollama_stub`` works too, but then every test parameter ``ollama_stub`` is flagged
    by ruff as F811 (redefinition of an unused import).
    """
    stub = OllamaStub().start()
    try:
        yield stub
    finally:
        stub.stop()


# The same fixture under its own name, for ``from tests.ollama_stub import ollama_stub``.
ollama_stub = ollama_stub_fixture


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.ollama_stub --mode slow --delay-s 0.5``: serve until SIGTERM/Ctrl-C.

    The first line on stdout is the stub's URL (for a process that starts it, like
    ``tipgraph rehearse``).
    """
    parser = argparse.ArgumentParser(description="Ollama-protocol stub for tipgraph")
    parser.add_argument("--mode", choices=MODES, default="good")
    parser.add_argument("--delay-s", type=float, default=0.0, help='"slow" mode: seconds')
    for endpoint in ("chat", "judge", "embed"):
        parser.add_argument(
            f"--{endpoint}-latency-s", type=float, default=0.0, help=f"every {endpoint} call"
        )
    args = parser.parse_args(argv)
    stub = OllamaStub()
    stub.mode, stub.delay_s = args.mode, args.delay_s
    stub.latency_s = {
        "chat": args.chat_latency_s,
        "judge": args.judge_latency_s,
        "embed": args.embed_latency_s,
    }
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with stub:
        print(stub.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
