"""The ``judge`` alias: every generated tip is screened before it can be served.

One call per refill judges all of its tips for relevance to their task, actionability and
safety (``configs/prompts/<judge.prompt>.md``, versioned like the tip prompts).  A tip
flagged unsafe, scored below ``judge.min_score`` or left without a verdict is never
served; each is counted by reason.  When the judge itself fails (down, slow, nonsense)
``judge.on_failure`` decides: ``open`` keeps the tips unjudged (``judge_score`` None),
``closed`` keeps none.  This runs off the request path, so a dead judge delays refills at
most, and its own circuit breaker stops it from costing a timeout per refill.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from string import Template
from typing import Any

from tipgraph.contracts import TipRequest
from tipgraph.features import UserContext
from tipgraph.generation.breaker import CircuitBreaker
from tipgraph.generation.parsing import LLMTip, MalformedAnswer
from tipgraph.generation.prompts import PromptTemplate, task_lines
from tipgraph.generation.source import Completer, LLMUnavailable
from tipgraph.settings import JudgeSettings

SYSTEM_PROMPT = "You are a careful reviewer. Answer with JSON only."


@dataclass(frozen=True)
class Verdict:
    relevance: float
    actionability: float
    safe: bool

    @property
    def score(self) -> float:
        return (self.relevance + self.actionability) / 2


@dataclass
class Screened:
    """The tips a refill may keep, each with its judge score (None: kept unjudged)."""

    kept: list[tuple[LLMTip, float | None]]
    rejected: Counter[str] = field(default_factory=Counter)
    failure: str | None = None
    """Why the judge could not be asked or answered nothing usable; None when it judged."""


def _unit(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else None


def parse_verdicts(text: str, n_tips: int) -> dict[int, Verdict]:
    """The judge's answer -> a verdict per tip index; an item that is not a well-formed
    verdict is skipped (its tip gets none).  ``safe`` must be the JSON literal ``true``
    for a tip to count as safe.  Raises MalformedAnswer when the answer is not JSON."""
    try:
        data = json.loads(text.strip().strip("`").removeprefix("json"))
    except json.JSONDecodeError as err:
        raise MalformedAnswer(f"judge answer is not JSON ({err.msg})") from err
    items = data.get("verdicts") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise MalformedAnswer('judge answer is JSON but has no "verdicts" list')
    verdicts: dict[int, Verdict] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        index = item.get("index")
        relevance, actionability = _unit(item.get("relevance")), _unit(item.get("actionability"))
        if (
            isinstance(index, int)
            and not isinstance(index, bool)
            and 0 <= index < n_tips
            and index not in verdicts
            and relevance is not None
            and actionability is not None
        ):
            verdicts[index] = Verdict(relevance, actionability, item.get("safe") is True)
    return verdicts


class Judge:
    def __init__(
        self,
        settings: JudgeSettings,
        template: PromptTemplate,
        completer: Completer,
        breaker: CircuitBreaker,
        *,
        send_task_text: bool,
    ) -> None:
        self.settings = settings
        self.template = template
        self.completer = completer
        self.breaker = breaker
        self.send_task_text = send_task_text

    @property
    def version(self) -> str:
        return self.template.version

    def messages(
        self, tips: list[LLMTip], request: TipRequest, context: UserContext
    ) -> list[dict[str, str]]:
        listed = [{"index": i, "tip": t.content, "task_id": t.task_id} for i, t in enumerate(tips)]
        prompt = Template(self.template.text).safe_substitute(
            tasks=task_lines(request, context, send_task_text=self.send_task_text),
            tips=json.dumps(listed, ensure_ascii=True),
        )
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]

    async def screen(
        self, tips: list[LLMTip], request: TipRequest, context: UserContext
    ) -> Screened:
        try:
            verdicts = await self._ask(tips, request, context)
        except (LLMUnavailable, MalformedAnswer, TimeoutError) as err:
            failure = f"{type(err).__name__}: {err}"[:300]
            if self.settings.on_failure == "open":
                return Screened([(t, None) for t in tips], failure=failure)
            return Screened([], Counter(unjudged=len(tips)), failure=failure)
        screened = Screened([])
        for i, tip in enumerate(tips):
            verdict = verdicts.get(i)
            if verdict is None:
                screened.rejected["no_verdict"] += 1
            elif not verdict.safe:
                screened.rejected["unsafe"] += 1
            elif verdict.score < self.settings.min_score:
                screened.rejected["low_score"] += 1
            else:
                screened.kept.append((tip, verdict.score))
        return screened

    async def _ask(
        self, tips: list[LLMTip], request: TipRequest, context: UserContext
    ) -> dict[int, Verdict]:
        if not self.breaker.allow():
            raise LLMUnavailable("judge circuit open")
        timeout = self.settings.timeout_s
        try:
            completion = await asyncio.wait_for(
                self.completer(
                    self.settings.model_alias, self.messages(tips, request, context), timeout
                ),
                timeout=timeout,
            )
            verdicts = parse_verdicts(completion.text, len(tips))
        except (LLMUnavailable, MalformedAnswer, TimeoutError):
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return verdicts
