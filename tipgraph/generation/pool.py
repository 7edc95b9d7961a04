"""The candidate pool: LLM tips generated ahead of need, served at task-mode speed.

A request reads the pool entry of its user's task set (:func:`task_fingerprint`) under the
user's prompt version: one read, never a write on the request path (serves are counted
in memory and flushed every second, :meth:`PooledGenerator.flush_serves`).  A hit serves
its tips at once; a miss serves task tips at once and queues a refill, so the user's next
request finds LLM tips.  An entry is refilled once it has served
``pool.refresh_after_serves`` decisions (its tips keep serving meanwhile), expires after
``pool.ttl_s``, and is replaced when the user's tasks change.

Refills run off the request path: in the Serve graph, the generation replicas send them
(:class:`RefillSender`) to the ``pool`` deployment, whose replicas run at a lower CPU
priority; in one process (:class:`tipgraph.local.LocalStages`), beside the requests.  A
bounded queue holds each key once (:class:`RefillQueue`); across replicas, a claim in the
store lets one refill per key run at a time (:class:`Refiller`).  A refill asks the
``tip-generator`` alias, screens the tips with the ``judge`` alias, embeds them with the
``embedder`` alias and drops near-duplicates, then stores what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from tipgraph.autoscaling import ItemLoad
from tipgraph.candidates import Candidate, task_candidates
from tipgraph.contracts import MAX_CANDIDATES, TipRequest
from tipgraph.features import UserContext
from tipgraph.generation.breaker import CircuitBreaker
from tipgraph.generation.embedder import Embedder, cached_projections, near_duplicates
from tipgraph.generation.judge import Judge
from tipgraph.generation.parsing import LLMTip
from tipgraph.generation.prompts import PromptSplit, PromptTemplate
from tipgraph.generation.source import (
    GenerationFailed,
    GenerationItem,
    GenerationResult,
    TipGenerator,
    llm_candidate,
)
from tipgraph.metrics import Metrics
from tipgraph.projection import PROJECTION
from tipgraph.settings import GenerationSettings
from tipgraph.store import DecisionStore, PoolEntry, PoolKey, PoolTip, StoreError
from tipgraph.text import clean_text

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def task_fingerprint(request: TipRequest) -> str:
    """What a pool entry's tips were written for: every task's id, a hash of its text,
    its priority and due date.  Any change to the task set is a new fingerprint."""
    digest = hashlib.sha256()
    for task in sorted(request.tasks, key=lambda t: t.id):
        content = hashlib.sha256(task.content.encode()).hexdigest()
        due = task.due.isoformat() if task.due else ""
        digest.update(f"{task.id}\x1f{content}\x1f{task.priority}\x1f{due}\x1e".encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class RefillJob:
    """What one refill needs; it lives only in the queue, so task text is never stored."""

    key: PoolKey
    request: TipRequest
    context: UserContext
    template: PromptTemplate


class Refills(Protocol):
    """Where the request path sends the refills it finds due, without waiting for them."""

    def submit_many(self, jobs: Sequence[RefillJob]) -> object: ...


class RefillQueue:
    """A bounded queue of refills that holds each key at most once, queued or running,
    worked by ``workers`` tasks on the running event loop (started on first use)."""

    def __init__(
        self,
        refill: Callable[[RefillJob], Awaitable[str]],
        *,
        size: int,
        workers: int,
        metrics: Metrics,
        load: ItemLoad | None = None,
    ) -> None:
        self._refill = refill
        self.load = load if load is not None else ItemLoad()
        """Refills queued or running, over time: what the pool deployment scales on."""
        self._size = size
        self._n_workers = workers
        self._metrics = metrics
        self._pending: dict[PoolKey, RefillJob] = {}
        self._queue: asyncio.Queue[RefillJob] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.outcomes: dict[str, int] = {}

    def submit(self, job: RefillJob) -> str:
        """``queued``, ``deduplicated`` (already queued or running) or ``queue_full``."""
        if job.key in self._pending:
            outcome = "deduplicated"
        elif len(self._pending) >= self._size:
            outcome = "queue_full"
        else:
            self._pending[job.key] = job
            self.load.change(1)
            self._started().put_nowait(job)
            return "queued"
        self._count(outcome)
        return outcome

    def submit_many(self, jobs: Sequence[RefillJob]) -> list[str]:
        return [self.submit(job) for job in jobs]

    @property
    def pending(self) -> int:
        """Refills queued or running."""
        return len(self._pending)

    async def join(self) -> None:
        """Wait until every queued refill has run (tests, shutdown)."""
        if self._queue is not None:
            await self._queue.join()

    def close(self) -> None:
        """Stop the workers (from outside their event loop: they are cancelled only)."""
        for worker in self._workers:
            worker.cancel()
        self._workers.clear()

    async def aclose(self) -> None:
        """Stop the workers and wait until they have (on their event loop)."""
        workers = list(self._workers)
        self.close()
        await asyncio.gather(*workers, return_exceptions=True)

    def _started(self) -> asyncio.Queue[RefillJob]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._workers = [
                asyncio.get_running_loop().create_task(self._work(), name=f"pool-refill-{i}")
                for i in range(self._n_workers)
            ]
        return self._queue

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            try:
                outcome = await self._refill(job)
            except Exception:  # a worker must survive whatever one refill does
                logger.exception("candidate-pool refill failed")
                outcome = "error"
            finally:
                self._pending.pop(job.key, None)
                self.load.change(-1)
                self._queue.task_done()
            self._count(outcome)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self._metrics.pool_refill(outcome)


class RefillSender:
    """The request path's side of a remote refill queue: sends each batch's refills in one
    call and does not wait for it.  At most ``max_in_flight`` calls are out at once; the
    refills of a batch beyond that are dropped (counted as ``not_sent``): the next request
    of the same task set finds its entry still due and sends them again."""

    def __init__(
        self,
        send: Callable[[list[RefillJob]], Awaitable[object]],
        *,
        max_in_flight: int,
        metrics: Metrics,
    ) -> None:
        self._send = send
        self._max_in_flight = max_in_flight
        self._metrics = metrics
        self._in_flight: set[asyncio.Task[None]] = set()

    def submit_many(self, jobs: Sequence[RefillJob]) -> None:
        if not jobs:
            return
        if len(self._in_flight) >= self._max_in_flight:
            self._metrics.pool_refill("not_sent", len(jobs))
            return
        task = asyncio.get_running_loop().create_task(self._deliver(list(jobs)))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def drain(self) -> None:
        """Wait until every call out has been answered (tests, shutdown)."""
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _deliver(self, jobs: list[RefillJob]) -> None:
        try:
            await self._send(jobs)
        except Exception as err:  # the pool replicas are down or busy: a later request resends
            self._metrics.pool_refill("not_sent", len(jobs))
            logger.warning(
                "%d candidate-pool refills not sent: %s", len(jobs), clean_text(str(err))[:200]
            )


class Refiller:
    """Generate, judge, embed and store one pool entry, holding the store's claim on it."""

    def __init__(
        self,
        settings: GenerationSettings,
        generator: TipGenerator,
        store: DecisionStore,
        *,
        judge: Judge | None,
        embedder: Embedder | None,
        metrics: Metrics,
        clock: Clock = _utcnow,
    ) -> None:
        self.settings = settings
        self.generator = generator
        self.store = store
        self.judge = judge
        self.embedder = embedder
        self.metrics = metrics
        self._clock = clock

    async def refill(self, job: RefillJob) -> str:
        pool = self.settings.pool
        now = self._clock()
        stale = now - timedelta(seconds=pool.claim_timeout_s)
        try:
            claim = await asyncio.to_thread(self.store.claim_pool_refill, job.key, now, stale)
        except StoreError as err:
            logger.warning("candidate-pool refill skipped, the store failed: %s", err)
            return "store_error"
        if claim is None:
            return "deduplicated"
        try:
            tips, model = await self._tips(job)
        except GenerationFailed as err:
            await self._release(job.key, claim)
            return err.kind
        except Exception:
            await self._release(job.key, claim)  # the next miss may try again at once
            raise
        filled_at = self._clock()
        try:
            filled = await asyncio.to_thread(
                self.store.fill_pool_entry,
                job.key,
                claim,
                tips,
                model=model,
                judge_version=self.judge.version if self.judge else None,
                now=filled_at,
                expires_at=filled_at + timedelta(seconds=pool.ttl_s),
            )
        except StoreError as err:
            logger.warning("candidate-pool refill not stored, the store failed: %s", err)
            return "store_error"
        return "filled" if filled else "claim_lost"

    async def _tips(self, job: RefillJob) -> tuple[list[PoolTip], str]:
        answer = await self.generator.ask(
            job.request,
            job.context,
            job.template,
            self.settings.pool.max_tips,
            self.settings.pool.generation_timeout_s,
        )
        excluded = set(job.request.exclude_ids)
        tips = [t for t in answer.parsed.tips if t.task_id not in excluded]
        scored: list[tuple[LLMTip, float | None]] = [(t, None) for t in tips]
        if self.judge is not None:
            screened = await self.judge.screen(tips, job.request, job.context)
            if screened.failure is not None:
                self.metrics.pool_aid_failed("judge")
                logger.warning(
                    "judge failed (on_failure=%s): %s",
                    self.judge.settings.on_failure,
                    clean_text(screened.failure),
                )
            for reason, count in screened.rejected.items():
                self.metrics.pool_tips_rejected(reason, count)
            scored = screened.kept
        embeddings: list[tuple[float, ...] | None] = [None] * len(scored)
        if self.embedder is not None:
            embeddings, scored = await self._embed(job, scored)
        pool_tips = [
            PoolTip(clean_text(t.content), t.kind, t.task_id, score, embedding)
            for (t, score), embedding in zip(scored, embeddings, strict=True)
        ]
        return pool_tips[: self.settings.pool.max_tips], answer.completion.model

    async def _embed(
        self, job: RefillJob, scored: list[tuple[LLMTip, float | None]]
    ) -> tuple[list[tuple[float, ...] | None], list[tuple[LLMTip, float | None]]]:
        """Embed the tips and, for the request path's cache, the user's task tips in one
        call; drop near-duplicate tips.  Without embeddings, the tips stay as they are."""
        assert self.embedder is not None
        texts = [t.content for t, _ in scored]
        task_texts = [c.content for c in task_candidates(job.request, job.context, MAX_CANDIDATES)]
        vectors = await self.embedder.vectors(self.store, job.key.user_key, texts + task_texts)
        if vectors is None:
            self.metrics.pool_aid_failed("embedder")
            return [None] * len(scored), scored
        tip_vectors = vectors[: len(texts)]
        dropped = near_duplicates(tip_vectors, self.embedder.settings.duplicate_cosine)
        self.metrics.pool_tips_rejected("near_duplicate", len(dropped))
        kept = [i for i in range(len(scored)) if i not in dropped]
        return [PROJECTION(tip_vectors[i]) for i in kept], [scored[i] for i in kept]

    async def _release(self, key: PoolKey, claim: str) -> None:
        # If the store fails here, the claim goes stale after pool.claim_timeout_s instead.
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self.store.release_pool_claim, key, claim)


class PooledGenerator:
    """The request path of ``generation.serve_from: pool``: never waits on the LLM."""

    def __init__(
        self,
        settings: GenerationSettings,
        split: PromptSplit,
        store: DecisionStore,
        refills: Refills,
        *,
        embedding_model: str | None,
        metrics: Metrics,
        breaker: CircuitBreaker | None = None,
        clock: Clock = _utcnow,
    ) -> None:
        self.settings = settings
        self.split = split
        self.store = store
        self.refills = refills
        self.embedding_model = embedding_model
        """Whose cached projections task tips get; None: the embedder is off."""
        self.breaker = breaker
        """The tip-generator's breaker where the refills run in this process; else None."""
        self._serves: Counter[tuple[PoolKey, datetime]] = Counter()
        self._serves_lock = threading.Lock()
        self.metrics = metrics
        self._clock = clock

    def key(self, request: TipRequest, user_key: str) -> tuple[PoolKey, PromptTemplate]:
        # The prompt arm is the user's, not the request's: one entry per user and task set.
        template = self.split.choose(user_key)
        return PoolKey(user_key, task_fingerprint(request), template.version), template

    async def candidates(
        self, request: TipRequest, context: UserContext, user_key: str, event_id: str, n: int
    ) -> GenerationResult:
        (result,) = await self.candidates_many([(request, context, user_key, event_id, n)])
        return result

    async def candidates_many(self, items: Sequence[GenerationItem]) -> list[GenerationResult]:
        """Candidates for a batch: its pool entries are read in one worker-thread call, and
        its task tips' cached projections in another (a thread hop per request would
        cost more than the reads)."""
        now = self._clock()
        keys = [self.key(request, user_key) for request, _, user_key, _, _ in items]
        entries = await asyncio.to_thread(self._read_entries, [key for key, _ in keys], now)
        due: dict[PoolKey, RefillJob] = {}
        results = []
        for (request, context, _, _, n), (key, template), entry in zip(
            items, keys, entries, strict=True
        ):
            result, refill = self._result(request, context, n, key, template, entry, now)
            results.append(result)
            if refill:
                due.setdefault(key, RefillJob(key, request, context, template))
        self.refills.submit_many(list(due.values()))
        if self.embedding_model is None:
            return results
        user_keys = [user_key for _, _, user_key, _, _ in items]
        return await asyncio.to_thread(self._with_task_embeddings, results, user_keys)

    def _read_entries(self, keys: list[PoolKey], now: datetime) -> list[PoolEntry | None]:
        entries: list[PoolEntry | None] = []
        for key in keys:
            try:
                entries.append(self.store.read_pool_entry(key, now))
            except StoreError as err:
                logger.warning("candidate pool unreadable, serving task tips: %s", err)
                entries.append(None)
        return entries

    def _result(
        self,
        request: TipRequest,
        context: UserContext,
        n: int,
        key: PoolKey,
        template: PromptTemplate,
        entry: PoolEntry | None,
        now: datetime,
    ) -> tuple[GenerationResult, bool]:
        """The candidates, and whether the entry is due for a refill."""
        if entry is None:
            self.metrics.pool_lookup("miss")
            self.metrics.generation_fallback("pool_miss")
            miss = GenerationResult(
                task_candidates(request, context, n),
                source="fallback",
                reason="pool miss: refill requested",
                prompt_version=template.version,
                pool="miss",
            )
            return miss, True
        self.metrics.pool_lookup("hit")
        due = self._count_serve(entry) >= self.settings.pool.refresh_after_serves
        return self._served(request, context, n, entry, now), due

    def _count_serve(self, entry: PoolEntry) -> int:
        """Count this serve of ``entry``; its serves so far, as far as this replica knows
        (the store's count plus what this replica has not flushed yet)."""
        generation = (entry.key, entry.generated_at)
        with self._serves_lock:
            self._serves[generation] += 1
            return entry.serves + self._serves[generation]

    def flush_serves(self) -> None:
        """Write the serves counted since the last flush, in one transaction, so that
        every replica sees when an entry is due for a refresh.  Kept for the next flush
        if the store fails."""
        with self._serves_lock:
            serves, self._serves = self._serves, Counter()
        try:
            self.store.count_pool_serves(serves)
        except StoreError as err:
            logger.warning("candidate-pool serves not counted yet, the store failed: %s", err)
            with self._serves_lock:
                self._serves.update(serves)

    def _with_task_embeddings(
        self, results: list[GenerationResult], user_keys: list[str]
    ) -> list[GenerationResult]:
        """Task tips get the projections cached by earlier refills, where there are some
        (blocking reads: called in a worker thread)."""
        assert self.embedding_model is not None
        out = []
        for result, user_key in zip(results, user_keys, strict=True):
            tasks = [i for i, c in enumerate(result.candidates) if c.source == "tasks"]
            if not tasks:
                out.append(result)
                continue
            candidates = list(result.candidates)
            found = cached_projections(
                self.store, user_key, [candidates[i].content for i in tasks], self.embedding_model
            )
            for i, embedding in zip(tasks, found, strict=True):
                if embedding is not None:
                    candidates[i] = dataclasses.replace(candidates[i], embedding=embedding)
            out.append(dataclasses.replace(result, candidates=candidates))
        return out

    def _served(
        self, request: TipRequest, context: UserContext, n: int, entry: PoolEntry, now: datetime
    ) -> GenerationResult:
        excluded = set(request.exclude_ids)
        llm: list[Candidate] = []
        for tip in entry.tips:
            candidate = llm_candidate(
                tip.content,
                tip.kind,
                tip.task_id,
                entry.model or "",
                entry.key.prompt_version,
                judge_score=tip.judge_score,
                embedding=tip.embedding,
            )
            if tip.task_id not in excluded and candidate.candidate_id not in excluded:
                llm.append(candidate)
        llm = llm[: min(n, self.settings.max_llm_candidates)]
        candidates = list(llm)
        room = n - len(llm)
        if self.settings.source == "mixed":
            room = min(self.settings.max_task_candidates, room)
        if room > 0 and (self.settings.source == "mixed" or not llm):
            candidates += task_candidates(request, context, room)
        return GenerationResult(
            candidates,
            source=self.settings.source if llm else "fallback",
            reason=None if llm else "pool entry has no tip left to serve",
            model=entry.model,
            prompt_version=entry.key.prompt_version,
            pool="hit",
            pool_age_s=max((now - entry.generated_at).total_seconds(), 0.0),
        )
