"""Candidate tips made from the user's own tasks (task mode: the embedded default, no LLM).

Deterministic: the same tasks at the same local time give the same candidates in the same
order, so decisions can be replayed.  LLM tips (``tipgraph.generation``) are
:class:`Candidate` objects too, with ``source="llm"``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tipgraph.contracts import Task, TipRequest
from tipgraph.features import CandidateView, UserContext

SMALL_TASK_CHARS = 40
LONG_TASK_CHARS = 80
SHOWN_CHARS = 80


@dataclass(frozen=True)
class Candidate:
    candidate_id: str
    kind: str
    content: str
    source: str
    task_ids: tuple[str, ...]
    model: str | None = None
    prompt_version: str | None = None
    judge_score: float | None = None
    """LLM tips from the pool: the judge's score; None for task tips and unjudged tips."""
    embedding: tuple[float, ...] | None = None
    """The projected embedding (tipgraph.projection); None until the tip has one."""
    redacted: str | None = None
    """The content with every quote of a task as ``[task]`` (privacy.store_tip_text:
    redact); None when it quotes none."""

    def stored_content(self, mode: Literal["quote", "redact"]) -> str:
        """What the decision log keeps of the text: ``quote`` as served, ``redact``
        without the quotes of the user's tasks."""
        return self.redacted if mode == "redact" and self.redacted is not None else self.content

    @property
    def view(self) -> CandidateView:
        return CandidateView(self.kind, self.task_ids, self.judge_score, self.embedding)

    @property
    def task_id(self) -> str | None:
        return self.task_ids[0] if self.task_ids else None


REDACTED_TASK = "[task]"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def _quoted(task: Task) -> str:
    return f"“{_short(task.content)}”"


def _redacted(_: Task) -> str:
    return f"“{REDACTED_TASK}”"


def _candidate_id(kind: str, task_ids: Sequence[str]) -> str:
    digest = hashlib.sha256("\x1f".join((kind, *task_ids)).encode()).hexdigest()[:12]
    return f"{kind}-{digest}"


def _make(kind: str, template: str, tasks: Sequence[Task]) -> Candidate:
    """A candidate whose text is ``template`` with ``{i}`` quoting ``tasks[i]``."""
    ids = tuple(task.id for task in tasks)
    # The tasks' text goes in as arguments, never into the template: braces in a task
    # are text.
    content = template.format(*(_quoted(task) for task in tasks))
    redacted = template.format(*(_redacted(task) for task in tasks))
    return Candidate(
        _candidate_id(kind, ids),
        kind,
        content,
        "tasks",
        ids,
        redacted=None if redacted == content else redacted,
    )


def _by_kind(request: TipRequest, context: UserContext) -> dict[str, list[Candidate]]:
    """Every candidate task mode can make, grouped by kind, best first within a kind."""
    excluded = set(request.exclude_ids)
    tasks = [t for t in request.tasks if t.id not in excluded]
    facts = context.tasks
    urgent_first = sorted(tasks, key=lambda t: (-t.priority, t.due is None, t.due or 0, t.id))
    out: dict[str, list[Candidate]] = {}

    out["focus"] = [
        _make("focus", "Focus on {0} next — nothing else for 25 minutes.", [t])
        for t in urgent_first[:2]
    ]
    out["overdue"] = [
        _make("overdue", "{0} is overdue: do it now, or move it to a date you'll keep.", [t])
        for t in urgent_first
        if facts[t.id].overdue
    ][:2]
    out["due_today"] = [
        _make("due_today", "{0} is due today — block time for it now.", [t])
        for t in urgent_first
        if facts[t.id].due_today
    ][:2]
    small = [t for t in reversed(urgent_first) if len(t.content) <= SMALL_TASK_CHARS][:4]
    if len(small) >= 3:
        names = ", ".join(f"{{{i}}}" for i in range(len(small)))
        out["batch"] = [
            _make(
                "batch", f"Batch {len(small)} quick tasks in one 20-minute sprint: {names}.", small
            )
        ]
    out["plan_day"] = (
        [
            _make(
                "plan_day",
                f"Take five minutes to plan: pick the 3 of your {len(tasks)} open tasks "
                "that matter most today.",
                urgent_first[:3],
            )
        ]
        if tasks
        else []
    )
    big = [t for t in urgent_first if len(t.content) >= LONG_TASK_CHARS or t.priority >= 3]
    out["break_down"] = [
        _make("break_down", "Break {0} into three small next steps.", [t]) for t in big[:1]
    ]
    return out


def task_candidates(request: TipRequest, context: UserContext, n: int) -> list[Candidate]:
    """Up to ``n`` candidates, taken round-robin across kinds so the policy sees variety.

    ``exclude_ids`` may name tasks (no tip about them) or candidate ids (tips already shown).
    """
    excluded = set(request.exclude_ids)
    groups = [
        [c for c in group if c.candidate_id not in excluded]
        for group in _by_kind(request, context).values()
    ]
    chosen: list[Candidate] = []
    seen: set[str] = set()
    depth = 0
    while len(chosen) < n and any(depth < len(group) for group in groups):
        for group in groups:
            if depth < len(group) and len(chosen) < n:
                candidate = group[depth]
                if candidate.candidate_id not in seen:
                    seen.add(candidate.candidate_id)
                    chosen.append(candidate)
        depth += 1
    return chosen
