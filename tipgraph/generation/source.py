"""Candidate generation: task tips, LLM tips, or both, always answering in time.

:class:`TipGenerator` asks the LLM (through a :class:`Completer`, in practice LiteLLM) for
tips, validates them, and falls back to task-mode candidates when the LLM is slow, down,
or talks nonsense, so a request is always served within ``generation.timeout_s``.  A
circuit breaker stops paying the timeout on every request while the LLM stays down.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from tipgraph.candidates import Candidate, task_candidates
from tipgraph.contracts import TipRequest
from tipgraph.features import UserContext
from tipgraph.generation.breaker import CircuitBreaker
from tipgraph.generation.parsing import MalformedAnswer, ParsedTips, parse_tips
from tipgraph.generation.prompts import PromptSplit, PromptTemplate
from tipgraph.metrics import Metrics
from tipgraph.settings import GenerationSettings

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You write short, concrete productivity tips. Answer with JSON only."
# Time kept back from the budget to build the fallback and answer.
FALLBACK_MARGIN_S = 0.05

FallbackReason = Literal[
    "circuit_open", "timeout", "llm_error", "malformed_answer", "no_valid_tips", "pool_miss"
]
"""Why task tips were served instead of LLM tips: the metric's tag. ``GenerationResult.reason``
says the same with details, for the decision log."""


class LLMUnavailable(Exception):
    """The LLM call failed. Carries only a message: it must cross Ray boundaries."""


@dataclass(frozen=True)
class Completion:
    text: str
    model: str


class Completer(Protocol):
    def __call__(
        self, alias: str, messages: list[dict[str, str]], timeout_s: float
    ) -> Awaitable[Completion]: ...


class GenerationFailed(Exception):
    """The LLM gave no usable tips: ``kind`` is the metric's tag, ``reason`` the details."""

    def __init__(self, kind: FallbackReason, reason: str) -> None:
        super().__init__(reason)
        self.kind: FallbackReason = kind
        self.reason = reason


@dataclass(frozen=True)
class LLMAnswer:
    completion: Completion
    parsed: ParsedTips


@dataclass(frozen=True)
class GenerationResult:
    candidates: list[Candidate]
    source: str  # "tasks", "llm", "mixed" or "fallback"
    reason: str | None = None  # why a fallback happened
    model: str | None = None
    prompt_version: str | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    llm_ms: float | None = None
    pool: str | None = None  # "hit" or "miss" when served from the candidate pool
    pool_age_s: float | None = None


GenerationItem = tuple[TipRequest, UserContext, str, str, int]
"""One request to the generation stage: (request, context, user_key, event_id, n)."""


class CandidateSource(Protocol):
    """What the generation stage serves from: a :class:`TipGenerator` (task tips, inline
    LLM) or a :class:`~tipgraph.generation.pool.PooledGenerator`."""

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The tip-generator's breaker where this process calls it; None where it does not
        (the pool's request path, when the pool deployment runs the refills)."""
        ...

    async def candidates(
        self, request: TipRequest, context: UserContext, user_key: str, event_id: str, n: int
    ) -> GenerationResult: ...


def llm_candidate(
    tip_content: str,
    kind: str,
    task_id: str | None,
    model: str,
    prompt_version: str,
    *,
    judge_score: float | None = None,
    embedding: tuple[float, ...] | None = None,
) -> Candidate:
    digest = hashlib.sha256(f"{kind}\x1f{tip_content}".encode()).hexdigest()[:12]
    return Candidate(
        candidate_id=f"{kind}-llm{digest}",
        kind=kind,
        content=tip_content,
        source="llm",
        task_ids=(task_id,) if task_id else (),
        model=model,
        prompt_version=prompt_version,
        judge_score=judge_score,
        embedding=embedding,
    )


class TipGenerator:
    def __init__(
        self,
        settings: GenerationSettings,
        *,
        split: PromptSplit | None = None,
        completer: Completer | None = None,
        breaker: CircuitBreaker | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if settings.source != "tasks" and (split is None or completer is None):
            raise ValueError(f"generation.source={settings.source!r} needs prompts and an LLM")
        self.settings = settings
        self.split = split
        self.completer = completer
        self.breaker = breaker or CircuitBreaker(
            settings.breaker.failure_threshold, settings.breaker.reset_after_s
        )
        self.metrics = metrics if metrics is not None else Metrics()

    async def candidates(
        self, request: TipRequest, context: UserContext, user_key: str, event_id: str, n: int
    ) -> GenerationResult:
        """:class:`CandidateSource`: task tips, or inline LLM tips (the prompt arm follows
        the event)."""
        return await self.generate(request, context, event_id, n)

    async def generate(
        self, request: TipRequest, context: UserContext, event_id: str, n: int
    ) -> GenerationResult:
        """Inline generation: ask the LLM on the request path, within ``timeout_s``."""
        if self.settings.source == "tasks":
            return GenerationResult(task_candidates(request, context, n), source="tasks")
        assert self.split is not None  # checked in __init__
        template = self.split.choose(event_id)
        start = time.perf_counter()
        n_llm = min(n, self.settings.max_llm_candidates)
        budget = max(self.settings.timeout_s - FALLBACK_MARGIN_S, 0.01)
        try:
            answer = await self.ask(request, context, template, n_llm, budget)
        except GenerationFailed as err:
            if err.kind != "circuit_open":
                logger.warning(
                    "LLM generation failed, serving task tips: %s",
                    err.reason,
                    extra={"event_id": event_id},
                )
            start_or_none = None if err.kind == "circuit_open" else start
            return self._fallback(
                request, context, n, template, err.kind, err.reason, start_or_none
            )
        return self._served(
            request, context, event_id, n, n_llm, template, answer.completion, answer.parsed, start
        )

    async def ask(
        self,
        request: TipRequest,
        context: UserContext,
        template: PromptTemplate,
        n: int,
        budget_s: float,
    ) -> LLMAnswer:
        """``n`` tips from the ``tip-generator`` alias, validated, within ``budget_s``; the
        breaker hears how it went.  Raises :class:`GenerationFailed` with the reason."""
        assert self.completer is not None  # checked in __init__
        if not self.breaker.allow():
            raise GenerationFailed("circuit_open", "circuit open")
        try:
            completion = await asyncio.wait_for(
                self.completer(
                    self.settings.model_alias,
                    self._messages(template, request, context, n),
                    budget_s,
                ),
                timeout=budget_s,
            )
            parsed = parse_tips(
                completion.text,
                task_ids={t.id for t in request.tasks},
                max_chars=self.settings.max_tip_chars,
            )
        except TimeoutError:
            failure = GenerationFailed("timeout", f"timeout after {budget_s:.2f}s")
        except LLMUnavailable as err:
            failure = GenerationFailed("llm_error", f"llm error: {err}")
        except MalformedAnswer as err:
            failure = GenerationFailed("malformed_answer", f"malformed answer: {err}")
        else:
            if parsed.tips:
                self.breaker.record_success()
                return LLMAnswer(completion, parsed)
            failure = GenerationFailed(
                "no_valid_tips", f"no valid tips (dropped {dict(parsed.dropped)})"
            )
        self.breaker.record_failure()
        raise failure

    def _messages(
        self, template: PromptTemplate, request: TipRequest, context: UserContext, n: int
    ) -> list[dict[str, str]]:
        prompt = template.render(
            request,
            context,
            n=n,
            max_chars=self.settings.max_tip_chars,
            send_task_text=self.settings.send_task_text,
        )
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]

    def _served(
        self,
        request: TipRequest,
        context: UserContext,
        event_id: str,
        n: int,
        n_llm: int,
        template: PromptTemplate,
        completion: Completion,
        parsed: ParsedTips,
        start: float,
    ) -> GenerationResult:
        if parsed.dropped:
            logger.info(
                "LLM answer: kept %d tips, dropped %s",
                len(parsed.tips),
                dict(parsed.dropped),
                extra={"event_id": event_id},
            )
        excluded = set(request.exclude_ids)
        llm = [
            llm_candidate(t.content, t.kind, t.task_id, completion.model, template.version)
            for t in parsed.tips
            if t.task_id not in excluded
        ][:n_llm]
        candidates = list(llm)
        if self.settings.source == "mixed":
            room = min(self.settings.max_task_candidates, n - len(llm))
            candidates += task_candidates(request, context, room) if room > 0 else []
        return GenerationResult(
            candidates,
            source=self.settings.source,
            model=completion.model,
            prompt_version=template.version,
            dropped=dict(parsed.dropped),
            llm_ms=(time.perf_counter() - start) * 1000,
        )

    def _fallback(
        self,
        request: TipRequest,
        context: UserContext,
        n: int,
        template: PromptTemplate,
        kind: FallbackReason,
        reason: str,
        start: float | None = None,
    ) -> GenerationResult:
        self.metrics.generation_fallback(kind)
        # The prompt arm is still recorded: A/B value per prompt_version counts its fallbacks.
        return GenerationResult(
            task_candidates(request, context, n),
            source="fallback",
            reason=reason,
            prompt_version=template.version,
            llm_ms=(time.perf_counter() - start) * 1000 if start is not None else None,
        )
