"""The candidate pool: the store's entries (SQLite and Postgres), the refill queue, the
judge, the embedder and the request path, with the real LiteLLM client against the
Ollama-protocol stub."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.factories import tip_body
from tests.ollama_stub import OllamaStub, ollama_stub_fixture, write_llm_config  # noqa: F401
from tests.test_metrics import RecordingSink
from tipgraph import simulated_tips
from tipgraph.contracts import TipRequest
from tipgraph.features import FEATURE_SPEC, build_context, candidate_matrix
from tipgraph.generation.embedder import near_duplicates
from tipgraph.generation.judge import parse_verdicts
from tipgraph.generation.litellm_client import build_candidate_source
from tipgraph.generation.pool import (
    PooledGenerator,
    RefillJob,
    RefillQueue,
    RefillSender,
    task_fingerprint,
)
from tipgraph.generation.prompts import PromptTemplate
from tipgraph.metrics import Metrics
from tipgraph.projection import PROJECTION
from tipgraph.settings import GenerationSettings, RewardSettings
from tipgraph.store import DecisionStore, PoolKey, PoolTip
from tipgraph.text import unsafe_character

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2026, 3, 4, 9, 30, tzinfo=UTC)
KEY = PoolKey("user-a", "fp-1", "tips_v1-0000")
TIPS = [PoolTip("Block 25 minutes for the report.", "focus", "t1", 0.9)]


def _fill(
    store: DecisionStore, key: PoolKey = KEY, *, now: datetime = T0, ttl_s: float = 60
) -> str:
    claim = store.claim_pool_refill(key, now, now - timedelta(seconds=120))
    assert claim is not None
    assert store.fill_pool_entry(
        key,
        claim,
        TIPS,
        model="ollama_chat/llama3.2:3b",
        judge_version="judge_v1-1",
        now=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )
    return claim


# --- the store: both backends ------------------------------------------------------------


def test_miss_then_hit_and_serves_counted_for_the_tips_served(store: DecisionStore) -> None:
    assert store.read_pool_entry(KEY, T0) is None
    _fill(store)
    first = store.read_pool_entry(KEY, T0 + timedelta(seconds=1))
    assert first is not None
    assert first.tips == tuple(TIPS) and first.model == "ollama_chat/llama3.2:3b"
    assert first.generated_at == T0 and first.judge_version == "judge_v1-1"
    assert first.serves == 0
    store.count_pool_serves({(KEY, T0): 2})
    store.count_pool_serves({(KEY, T0): 1, (KEY, T0 - timedelta(seconds=9)): 5})
    second = store.read_pool_entry(KEY, T0 + timedelta(seconds=2))
    assert second is not None and second.serves == 3  # the older tips' count is dropped
    assert store.read_pool_entry(PoolKey("user-a", "fp-1", "tips_v2-0000"), T0) is None


def test_entries_expire(store: DecisionStore) -> None:
    _fill(store, ttl_s=60)
    assert store.read_pool_entry(KEY, T0 + timedelta(seconds=59)) is not None
    assert store.read_pool_entry(KEY, T0 + timedelta(seconds=60)) is None
    removed = store.clean_pool(T0 + timedelta(seconds=61), stale_before=T0, max_entries=10)
    assert removed == 1
    # Gone for good: a new claim starts from nothing.
    assert store.claim_pool_refill(KEY, T0 + timedelta(seconds=62), T0) is not None


def test_one_claim_at_a_time_and_a_stale_one_is_taken_over(store: DecisionStore) -> None:
    stale_after = timedelta(seconds=120)
    claim = store.claim_pool_refill(KEY, T0, T0 - stale_after)
    assert claim is not None
    later = T0 + timedelta(seconds=5)
    assert store.claim_pool_refill(KEY, later, later - stale_after) is None
    much_later = T0 + timedelta(seconds=300)
    taken_over = store.claim_pool_refill(KEY, much_later, much_later - stale_after)
    assert taken_over is not None
    # The first holder's fill no longer lands; the new holder's does.
    assert not store.fill_pool_entry(
        KEY, claim, TIPS, model=None, judge_version=None, now=much_later, expires_at=much_later
    )
    assert store.fill_pool_entry(
        KEY,
        taken_over,
        TIPS,
        model=None,
        judge_version=None,
        now=much_later,
        expires_at=much_later + stale_after,
    )


def test_a_refill_keeps_the_old_tips_serving_and_resets_serves(store: DecisionStore) -> None:
    _fill(store)
    store.count_pool_serves({(KEY, T0): 4})
    claim = store.claim_pool_refill(KEY, T0 + timedelta(seconds=5), T0)
    assert claim is not None
    during = store.read_pool_entry(KEY, T0 + timedelta(seconds=6))
    assert during is not None and during.serves == 4  # still served while refilling
    new = [PoolTip("Break the report into three steps.", "break_down", "t1", 0.8)]
    assert store.fill_pool_entry(
        KEY,
        claim,
        new,
        model="m2",
        judge_version=None,
        now=T0 + timedelta(seconds=7),
        expires_at=T0 + timedelta(seconds=600),
    )
    store.count_pool_serves({(KEY, T0): 2})  # late counts for the replaced tips
    after = store.read_pool_entry(KEY, T0 + timedelta(seconds=8))
    assert after is not None and after.tips == tuple(new) and after.serves == 0


def test_new_task_set_replaces_the_users_old_entries(store: DecisionStore) -> None:
    _fill(store)
    other_user = PoolKey("user-b", "fp-1", KEY.prompt_version)
    _fill(store, other_user)
    _fill(store, PoolKey("user-a", "fp-2", KEY.prompt_version), now=T0 + timedelta(seconds=1))
    assert store.read_pool_entry(KEY, T0 + timedelta(seconds=2)) is None
    assert store.read_pool_entry(other_user, T0 + timedelta(seconds=2)) is not None


def test_total_bound_evicts_the_oldest(store: DecisionStore) -> None:
    keys = [PoolKey(f"user-{i}", "fp", "p") for i in range(5)]
    for i, key in enumerate(keys):
        _fill(store, key, now=T0 + timedelta(seconds=i), ttl_s=3600)
    removed = store.clean_pool(T0 + timedelta(seconds=10), stale_before=T0, max_entries=3)
    assert removed == 2
    now = T0 + timedelta(seconds=11)
    assert [store.read_pool_entry(k, now) is not None for k in keys] == [
        False,
        False,
        True,
        True,
        True,
    ]


def test_erasure_removes_pool_entries_and_embeddings_and_a_late_fill(
    store: DecisionStore,
) -> None:
    _fill(store)
    store.cache_embeddings("user-a", {"h1": ([0.1, 0.2], [1.0])}, "embedder-model", T0)
    late = PoolKey("user-a", "fp-9", KEY.prompt_version)
    late_claim = store.claim_pool_refill(late, T0, T0 - timedelta(seconds=1))
    assert late_claim is not None
    store.erase_users(["user-a"])
    assert store.read_pool_entry(KEY, T0) is None
    assert store.cached_embeddings("user-a", ["h1"], "embedder-model") == {}
    # A refill that was running during the erasure finds its claim gone: nothing lands.
    assert not store.fill_pool_entry(
        late, late_claim, TIPS, model=None, judge_version=None, now=T0, expires_at=T0
    )
    assert store.read_pool_entry(late, T0 - timedelta(seconds=1)) is None


def test_unsafe_text_never_reaches_the_pool(store: DecisionStore) -> None:
    dirty = PoolTip("Block\x00 time \u202efor it\u2066 now.", "focus", "t\x001", None)
    claim = store.claim_pool_refill(KEY, T0, T0)
    assert claim is not None
    store.fill_pool_entry(
        KEY, claim, [dirty], model="m\x00", judge_version=None, now=T0, expires_at=T0 + timedelta(1)
    )
    entry = store.read_pool_entry(KEY, T0)
    assert entry is not None
    (tip,) = entry.tips
    assert unsafe_character(tip.content) is None and tip.content == "Block time for it now."
    assert tip.task_id == "t1" and entry.model == "m" and tip.judge_score is None


def test_embeddings_are_cached_per_user_and_model(store: DecisionStore) -> None:
    store.cache_embeddings(
        "user-a", {"h1": ([0.5, -0.25], [1.0, 0.0]), "h2": ([1.0, 0.0], [0.0, 1.0])}, "m1", T0
    )
    assert store.cached_embeddings("user-a", ["h1", "h3"], "m1") == {"h1": [0.5, -0.25]}
    assert store.cached_projections("user-a", ["h2", "h1"], "m1") == {
        "h2": [0.0, 1.0],
        "h1": [1.0, 0.0],
    }
    assert store.cached_embeddings("user-a", ["h1"], "m2") == {}
    assert store.cached_embeddings("user-b", ["h1"], "m1") == {}


# --- pieces without I/O --------------------------------------------------------------------


def test_fingerprint_follows_the_task_set_not_the_order() -> None:
    body = tip_body()
    request = TipRequest.model_validate(body)
    shuffled = TipRequest.model_validate({**body, "tasks": list(reversed(body["tasks"]))})
    edited = TipRequest.model_validate(
        {**body, "tasks": [{**body["tasks"][0], "content": "Another report"}, *body["tasks"][1:]]}
    )
    assert task_fingerprint(request) == task_fingerprint(shuffled)
    assert task_fingerprint(request) != task_fingerprint(edited)


def test_judge_verdicts_are_validated() -> None:
    answer = json.dumps(
        {
            "verdicts": [
                {"index": 0, "relevance": 0.9, "actionability": 2, "safe": True},
                {"index": 1, "relevance": "high", "actionability": 0.5, "safe": True},
                {"index": 2, "relevance": 0.9, "actionability": 0.9, "safe": "yes"},
                {"index": 7, "relevance": 0.9, "actionability": 0.9, "safe": True},
                {"index": 0, "relevance": 0.0, "actionability": 0.0, "safe": False},
            ]
        }
    )
    verdicts = parse_verdicts(answer, 3)
    assert set(verdicts) == {0, 2}
    assert verdicts[0].actionability == 1.0 and verdicts[0].safe
    assert not verdicts[2].safe  # only the JSON literal true counts as safe


def test_near_duplicates_keep_the_first() -> None:
    vectors = [[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [0.02, 1.0]]
    assert near_duplicates(vectors, 0.95) == {1, 3}


async def test_refill_queue_holds_each_key_once_and_is_bounded() -> None:
    release = asyncio.Event()
    started: list[PoolKey] = []

    async def refill(job: Any) -> str:
        started.append(job.key)
        await release.wait()
        return "filled"

    queue = RefillQueue(refill, size=2, workers=1, metrics=Metrics())
    job = _job(KEY)
    assert [queue.submit(job) for _ in range(3)] == ["queued", "deduplicated", "deduplicated"]
    assert queue.submit(_job(PoolKey("u", "f", "p"))) == "queued"
    assert queue.submit(_job(PoolKey("v", "f", "p"))) == "queue_full"
    # What the pool deployment scales on: refills queued or running.
    assert queue.pending == queue.load.items == 2
    release.set()
    await queue.join()
    assert queue.load.items == 0
    assert started == [KEY, PoolKey("u", "f", "p")]
    assert queue.outcomes == {"deduplicated": 2, "queue_full": 1, "filled": 2}
    assert queue.submit(job) == "queued"  # done: the key may be queued again
    await queue.join()
    await queue.aclose()


def _job(key: PoolKey) -> Any:
    request = TipRequest.model_validate(tip_body())

    return RefillJob(
        key, request, build_context(request, [], RewardSettings()), PromptTemplate("t", "")
    )


# --- the request path with the real LiteLLM client and the stub ----------------------------


def _settings(tmp_path: Path, stub: OllamaStub, **overrides: Any) -> GenerationSettings:
    values: dict[str, Any] = {
        "source": "mixed",
        "llm_config": str(write_llm_config(tmp_path / "llm.yaml", stub)),
        "prompts_dir": str(ROOT / "configs" / "prompts"),
        "timeout_s": 5.0,
        "breaker": {"failure_threshold": 1000, "reset_after_s": 60},
    }
    for section, value in overrides.items():
        values[section] = value
    return GenerationSettings.model_validate(values)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[DecisionStore]:
    from tipgraph.store import SQLiteStore

    store = SQLiteStore(f"sqlite:///{tmp_path / 'pool.db'}")
    store.open()
    yield store
    store.close()


class Pooled:
    def __init__(self, settings: GenerationSettings, store: DecisionStore) -> None:
        self.sink = RecordingSink()
        self.metrics = Metrics(self.sink)
        source, queue = build_candidate_source(settings, store, metrics=self.metrics)
        assert isinstance(source, PooledGenerator) and queue is not None
        self.source, self.queue, self.store = source, queue, store
        self.request = TipRequest.model_validate(tip_body())
        self.context = build_context(self.request, [], RewardSettings())

    async def ask(self, user_key: str = "user-a", n: int = 8) -> Any:
        return await self.source.candidates(self.request, self.context, user_key, "e1", n)


async def test_a_miss_serves_task_tips_at_once_and_the_next_request_hits(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    ollama_stub.latency_s = {"chat": 1.0, "judge": 0.0, "embed": 0.0}
    pooled = Pooled(_settings(tmp_path, ollama_stub), sqlite_store)
    miss = await pooled.ask()
    # Answered while the refill is still waiting for the model.
    assert pooled.queue.pending == 1 and not pooled.store.read_pool_entry(
        pooled.source.key(pooled.request, "user-a")[0], datetime.now(UTC)
    )
    assert (miss.source, miss.pool) == ("fallback", "miss")
    assert {c.source for c in miss.candidates} == {"tasks"}
    await pooled.queue.join()
    hit = await pooled.ask()
    assert (hit.source, hit.pool, hit.reason) == ("mixed", "hit", None)
    llm = [c for c in hit.candidates if c.source == "llm"]
    assert llm and all(c.judge_score is not None and c.judge_score >= 0.5 for c in llm)
    assert hit.model == "ollama_chat/llama3.2:3b" and hit.prompt_version.startswith("tips_v1-")
    assert hit.pool_age_s is not None and hit.pool_age_s >= 0
    assert len(ollama_stub.requests) == 1 and len(ollama_stub.judge_requests) == 1
    await pooled.queue.aclose()


async def test_remote_refills_leave_in_one_call_per_batch_and_never_hold_a_request(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    """The Serve graph's request path: refills go to the pool deployment (here a function
    that does not answer until told), and this process calls no model."""
    sink = RecordingSink()
    metrics = Metrics(sink)
    sent: list[list[PoolKey]] = []
    answer = asyncio.Event()

    async def send(jobs: list[RefillJob]) -> list[str]:
        sent.append([job.key for job in jobs])
        await answer.wait()
        return ["queued"] * len(jobs)

    sender = RefillSender(send, max_in_flight=1, metrics=metrics)
    settings = _settings(tmp_path, ollama_stub)
    source, queue = build_candidate_source(settings, sqlite_store, refills=sender, metrics=metrics)
    assert isinstance(source, PooledGenerator) and queue is None and source.breaker is None
    request = TipRequest.model_validate(tip_body())
    context = build_context(request, [], RewardSettings())
    batch = [(request, context, user, f"e{i}", 8) for i, user in enumerate("aaab")]
    results = await asyncio.wait_for(source.candidates_many(batch), timeout=5)
    assert [r.pool for r in results] == ["miss"] * 4
    assert results[0].reason == "pool miss: refill requested"
    await asyncio.sleep(0)  # the call leaves on the event loop, after the answer
    # One call for the batch, one refill per key.
    assert sent == [[source.key(request, "a")[0], source.key(request, "b")[0]]]
    assert sender.in_flight == 1
    # A batch while the one call allowed is out: its refill is dropped and counted; the
    # next request of that task set finds its entry still missing and asks again.
    await source.candidates_many(batch[:1])
    assert sink.total("tipgraph_pool_refills", outcome="not_sent") == 1
    answer.set()
    await sender.drain()
    assert sender.in_flight == 0

    async def unreachable(jobs: list[RefillJob]) -> list[str]:
        raise RuntimeError("no pool replica")

    failing = RefillSender(unreachable, max_in_flight=4, metrics=metrics)
    failing.submit_many([_job(KEY), _job(PoolKey("u", "f", "p"))])
    await failing.drain()
    assert sink.total("tipgraph_pool_refills", outcome="not_sent") == 3
    assert ollama_stub.requests == [] and ollama_stub.judge_requests == []


async def test_a_burst_for_one_key_causes_one_generation(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    ollama_stub.latency_s = {"chat": 0.5, "judge": 0.0, "embed": 0.0}
    pooled = Pooled(_settings(tmp_path, ollama_stub), sqlite_store)
    results = await asyncio.gather(*(pooled.ask() for _ in range(100)))
    assert {r.pool for r in results} == {"miss"}
    await pooled.queue.join()
    assert len(ollama_stub.requests) == 1
    assert pooled.queue.outcomes == {"deduplicated": 99, "filled": 1}
    await pooled.queue.aclose()


async def test_an_entry_is_refreshed_after_serving_and_tips_change(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    settings = _settings(tmp_path, ollama_stub, pool={"refresh_after_serves": 2})
    pooled = Pooled(settings, sqlite_store)
    await pooled.ask()
    await pooled.queue.join()
    for _ in range(2):
        assert (await pooled.ask()).pool == "hit"
    await pooled.queue.join()
    assert len(ollama_stub.requests) == 2  # the second serve queued a refresh
    assert (await pooled.ask()).pool == "hit"
    await pooled.queue.join()
    assert len(ollama_stub.requests) == 2  # new tips: their first serve
    # Another replica's serves reach this one through the store.
    pooled.source.flush_serves()
    other = Pooled(settings, sqlite_store)
    assert (await other.ask()).pool == "hit"
    await other.queue.join()
    assert len(ollama_stub.requests) == 3  # 1 flushed + 1 here = 2: due for a refresh
    await other.queue.aclose()
    await pooled.queue.aclose()


async def test_a_dead_model_trips_the_breaker_and_misses_stop_calling_it(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    ollama_stub.mode = "error"
    settings = _settings(tmp_path, ollama_stub, breaker={"failure_threshold": 2})
    pooled = Pooled(settings, sqlite_store)
    for i in range(5):
        answer = await pooled.ask(user_key=f"user-{i}")
        assert answer.pool == "miss" and answer.candidates  # task tips, always
        await pooled.queue.join()
    assert len(ollama_stub.requests) == 2 and pooled.source.breaker.state == "open"
    assert pooled.queue.outcomes == {"llm_error": 2, "circuit_open": 3}
    # The failed refills gave their claims back: the next miss may try again.
    key = pooled.source.key(pooled.request, "user-0")[0]
    assert sqlite_store.claim_pool_refill(key, datetime.now(UTC), datetime.now(UTC)) is not None
    await pooled.queue.aclose()


async def test_a_refill_that_breaks_gives_its_claim_back(
    tmp_path: Path,
    ollama_stub: OllamaStub,
    sqlite_store: DecisionStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pooled = Pooled(_settings(tmp_path, ollama_stub), sqlite_store)
    refiller = pooled.queue._refill.__self__  # type: ignore[attr-defined]

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug in the judge")

    monkeypatch.setattr(refiller.judge, "screen", broken)
    assert (await pooled.ask()).pool == "miss"
    await pooled.queue.join()
    assert pooled.queue.outcomes == {"error": 1}
    key = pooled.source.key(pooled.request, "user-a")[0]
    assert sqlite_store.claim_pool_refill(key, datetime.now(UTC), datetime.now(UTC)) is not None
    await pooled.queue.aclose()


@pytest.mark.parametrize("on_failure", ["open", "closed"])
async def test_a_dead_judge_fails_open_or_closed(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore, on_failure: str
) -> None:
    ollama_stub.judge_mode = "error"
    settings = _settings(tmp_path, ollama_stub, judge={"on_failure": on_failure})
    pooled = Pooled(settings, sqlite_store)
    await pooled.ask()
    await pooled.queue.join()
    answer = await pooled.ask()
    llm = [c for c in answer.candidates if c.source == "llm"]
    if on_failure == "open":
        assert llm and all(c.judge_score is None for c in llm)  # served, marked unjudged
        assert pooled.sink.total("tipgraph_pool_tips_rejected") == 0
    else:
        assert not llm and answer.source == "fallback" and answer.pool == "hit"
        assert pooled.sink.total("tipgraph_pool_tips_rejected", reason="unjudged") >= 1
    assert pooled.sink.total("tipgraph_pool_aids_failed", alias="judge") == 1
    assert len(ollama_stub.judge_requests) == 1
    await pooled.queue.aclose()


async def test_the_judge_keeps_unsafe_and_vague_tips_out(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    settings = _settings(tmp_path, ollama_stub, pool={"max_tips": 20})
    pooled = Pooled(settings, sqlite_store)
    await pooled.ask()
    await pooled.queue.join()
    judged = ollama_stub.judge_requests[0]["messages"][-1]["content"]
    assert "Skip sleep" in judged and "someday" in judged  # the model did write both
    answer = await pooled.ask(n=20)
    served = [c.content for c in answer.candidates if c.source == "llm"]
    assert served and not any("Skip sleep" in s or "someday" in s for s in served)
    assert pooled.sink.total("tipgraph_pool_tips_rejected", reason="unsafe") >= 1
    assert pooled.sink.total("tipgraph_pool_tips_rejected", reason="low_score") >= 1
    await pooled.queue.aclose()


async def test_a_dead_embedder_changes_nothing_served(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    ollama_stub.embed_mode = "error"
    pooled = Pooled(_settings(tmp_path, ollama_stub), sqlite_store)
    await pooled.ask()
    await pooled.queue.join()
    answer = await pooled.ask()
    assert answer.pool == "hit" and any(c.source == "llm" for c in answer.candidates)
    assert len(ollama_stub.embed_requests) == 1
    # Features marked missing, never a crash: a zero block and the indicator.
    assert all(c.embedding is None for c in answer.candidates)
    X = candidate_matrix(pooled.context, [c.view for c in answer.candidates])
    assert set(X[:, FEATURE_SPEC.names.index("embedding_missing")]) == {1.0}
    await pooled.queue.aclose()


async def test_llm_and_task_tips_carry_their_projected_embeddings(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    pooled = Pooled(_settings(tmp_path, ollama_stub), sqlite_store)
    miss = await pooled.ask()
    assert all(c.embedding is None for c in miss.candidates)  # nothing embedded yet
    await pooled.queue.join()
    hit = await pooled.ask()
    assert {c.source for c in hit.candidates} == {"llm", "tasks"}
    for candidate in hit.candidates:
        assert candidate.embedding == PROJECTION(simulated_tips.embed(candidate.content))
    assert len(ollama_stub.embed_requests) == 1  # tips and task tips in one call
    await pooled.queue.aclose()


async def test_near_duplicate_tips_are_dropped(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    ollama_stub.content = json.dumps(
        {
            "tips": [
                {"content": "Block 25 minutes for the report now.", "kind": "focus"},
                {"content": "Block 25 minutes for the report, now!", "kind": "focus"},
                {"content": "Set a timer and finish the first step.", "kind": "break_down"},
            ]
        }
    )
    pooled = Pooled(_settings(tmp_path, ollama_stub, judge={"enabled": False}), sqlite_store)
    await pooled.ask()
    await pooled.queue.join()
    answer = await pooled.ask()
    served = [c.content for c in answer.candidates if c.source == "llm"]
    assert served == [
        "Block 25 minutes for the report now.",
        "Set a timer and finish the first step.",
    ]
    await pooled.queue.aclose()


async def test_nul_bidi_and_overlong_model_output_is_never_stored_or_served(
    tmp_path: Path, ollama_stub: OllamaStub, sqlite_store: DecisionStore
) -> None:
    ollama_stub.content = json.dumps(
        {
            "tips": [
                {"content": "Block\x00 25 minutes \u202enow\u202c for t1.", "kind": "focus"},
                {"content": "x" * 5000, "kind": "focus"},
                {"content": "Finish \u2066the first\u2069 step.", "kind": "break_down"},
            ]
        }
    )
    pooled = Pooled(_settings(tmp_path, ollama_stub, judge={"enabled": False}), sqlite_store)
    await pooled.ask()
    await pooled.queue.join()
    key = pooled.source.key(pooled.request, "user-a")[0]
    entry = sqlite_store.read_pool_entry(key, datetime.now(UTC))
    assert entry is not None
    assert [t.content for t in entry.tips] == [
        "Block 25 minutes now for t1.",
        "Finish the first step.",
    ]
    answer = await pooled.ask()
    for candidate in answer.candidates:
        assert unsafe_character(candidate.content) is None and len(candidate.content) <= 280
    await pooled.queue.aclose()
