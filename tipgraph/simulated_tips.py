"""A small world of LLM tips with a hidden quality, shared by the simulator and the
Ollama-protocol stub (``tests/ollama_stub.py``), so both tell the same story.

* Tips are written from phrase templates; some are vague, a few unsafe.
* A tip's hidden quality (:func:`hidden_quality`, in [-1, 1]) is a weighted count of the
  words it uses.  The simulator's users act on good tips more often.  The judge weighs
  words too, but other ones: it screens out vague and unsafe tips, and its score says
  little about what these users like.
* Its embedding (:func:`embed`) is a bag of words over a fixed vocabulary plus hashed
  buckets for other words, so tips with the same words are close and the quality is a
  linear function of the embedding: learning on embedding features can find it.
* The judge (:func:`verdict`) scores relevance and actionability and flags unsafe
  wording.

Deterministic: the same prompt always gets the same answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

from tipgraph.generation.embedder import Embeddings
from tipgraph.generation.source import Completion, llm_candidate

KINDS = ("focus", "plan_day", "batch", "break_down", "overdue", "due_today")
EMBED_DIM = 64

USER_WEIGHTS: dict[str, float] = {
    # What the simulated users act on: time-boxed, concrete first steps.
    "timer": 1.2,
    "minutes": 0.8,
    "block": 0.6,
    "steps": 0.6,
    "first": 0.4,
    "now": 0.4,
    "sweep": 0.3,
    # ... and what they ignore: planning talk and rescheduling.
    "plan": -0.9,
    "three": -0.4,
    "reschedule": -0.7,
    "honestly": -0.3,
    "reserve": -0.2,
    "maybe": -1.2,
    "someday": -1.2,
    "think": -0.8,
    "eventually": -0.8,
}
JUDGE_WEIGHTS: dict[str, float] = {
    # What the judge sees: vague and unsafe tips, not what these users happen to like.
    "maybe": -1.2,
    "someday": -1.2,
    "think": -0.8,
    "motivated": -0.8,
    "eventually": -0.8,
    "skip": -0.6,
    "sleep": -0.6,
    "block": 0.3,
    "steps": 0.3,
    "reserve": 0.3,
    "plan": 0.3,
    "finish": 0.3,
}
UNSAFE_PHRASES = ("skip sleep", "no matter what")
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        (
            *USER_WEIGHTS,
            *JUDGE_WEIGHTS,
            "task",
            "tasks",
            "plan",
            "day",
            "batch",
            "break",
            "today",
            "overdue",
            "tab",
            "tabs",
            "lunch",
            "three",
            "small",
            "one",
            "honestly",
            "reschedule",
            "next",
            "your",
        )
    )
)

TEMPLATES = (
    "Start with task {i}: block 25 minutes and close every other tab.",
    "Plan your day around task {i}: pick the three things that must happen today.",
    "Batch the small items next to task {i} into one 20-minute sweep.",
    "Break task {i} into steps of at most 15 minutes and do the first one now.",
    "Task {i} is overdue: finish it or reschedule it honestly before lunch.",
    "Task {i} is due today: reserve a slot for it right after your next break.",
    "Set a timer for 10 minutes and finish the first step of task {i}.",
    "Think about task {i} someday, maybe when you feel motivated.",
    "Maybe look at task {i} eventually, when you think you have time.",
    "Skip sleep tonight and push through task {i} no matter what.",
)

_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def hidden_quality(text: str) -> float:
    """The tip's true usefulness to the simulated users in [-1, 1], which no request
    states; the judge sees only part of it (:data:`JUDGE_WEIGHTS`)."""
    return math.tanh(sum(USER_WEIGHTS.get(w, 0.0) for w in words(text)) / 2)


def _judged_quality(text: str) -> float:
    return math.tanh(sum(JUDGE_WEIGHTS.get(w, 0.0) for w in words(text)) / 2)


def embed(text: str) -> list[float]:
    """Unit bag-of-words vector: vocabulary words first, other words hashed."""
    vector = [0.0] * EMBED_DIM
    index = {w: i for i, w in enumerate(VOCABULARY)}
    spare = EMBED_DIM - len(VOCABULARY)
    for word in words(text):
        if word in index:
            vector[index[word]] += 1.0
        else:
            bucket = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
            vector[len(VOCABULARY) + bucket % spare] += 0.5
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


@dataclass(frozen=True)
class Verdict:
    relevance: float
    actionability: float
    safe: bool


def verdict(text: str) -> Verdict:
    quality = _judged_quality(text)
    lowered = " ".join(words(text))
    return Verdict(
        relevance=round(min(max(0.55 + 0.45 * quality, 0.0), 1.0), 3),
        actionability=round(min(max(0.5 + 0.5 * quality, 0.0), 1.0), 3),
        safe=not any(phrase in lowered for phrase in UNSAFE_PHRASES),
    )


def tips(count: int, task_ids: list[str], seed: str) -> list[dict[str, object]]:
    """``count`` tips for a prompt; ``seed`` (the prompt) picks where the templates start,
    so different task sets get different mixes."""
    start = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "little")
    out: list[dict[str, object]] = []
    for i in range(count):
        template = TEMPLATES[(start + i) % len(TEMPLATES)]
        out.append(
            {
                "content": f"{template.format(i=i + 1)} (tip {i + 1})",
                "kind": KINDS[(start + i) % len(KINDS)],
                "task_id": task_ids[i % len(task_ids)] if task_ids else None,
            }
        )
    return out


def judge_answer(prompt: str) -> str:
    """The judge's JSON answer to a prompt that lists tips as ``{"index": .., "tip": ..}``."""
    verdicts = []
    for item in _listed_tips(prompt):
        v = verdict(str(item.get("tip", "")))
        verdicts.append(
            {
                "index": item.get("index"),
                "relevance": v.relevance,
                "actionability": v.actionability,
                "safe": v.safe,
            }
        )
    return json.dumps({"verdicts": verdicts})


def _listed_tips(prompt: str) -> list[dict[str, object]]:
    for line in prompt.splitlines():
        line = line.strip()
        if line.startswith('[{"index"'):
            try:
                items = json.loads(line)
            except json.JSONDecodeError:
                return []
            return [i for i in items if isinstance(i, dict)]
    return []


_EXACTLY = re.compile(r"\bexactly\s+(\d+)", re.IGNORECASE)
_TASK_ID = re.compile(r'"id":\s*"([^"]+)"')


class SimulatedModels:
    """The three aliases in process, for simulations without HTTP: ``complete`` is a
    :class:`~tipgraph.generation.Completer` (tips, or verdicts when asked for them) and
    ``embed`` an :class:`~tipgraph.generation.embedder.EmbeddingClient`."""

    def __init__(self) -> None:
        self.generations = 0
        self.tips_written = 0
        self.judgements = 0
        self.embeddings = 0

    async def complete(
        self, alias: str, messages: list[dict[str, str]], timeout_s: float
    ) -> Completion:
        prompt = "\n".join(str(m.get("content", "")) for m in messages)
        if '"verdicts"' in prompt:
            self.judgements += 1
            return Completion(judge_answer(prompt), f"simulated/{alias}")
        self.generations += 1
        found = _EXACTLY.search(prompt)
        count = int(found.group(1)) if found else 5
        self.tips_written += count
        task_ids = list(dict.fromkeys(_TASK_ID.findall(prompt)))
        return Completion(json.dumps({"tips": tips(count, task_ids, prompt)}), f"simulated/{alias}")

    async def embed(self, alias: str, texts: list[str], timeout_s: float) -> Embeddings:
        self.embeddings += 1
        return Embeddings([embed(t) for t in texts], f"simulated/{alias}")


def candidate_ids(max_count: int = 50) -> dict[str, tuple[str, str]]:
    """Candidate id -> (kind, content) of every tip :func:`tips` can write (up to
    ``max_count`` per answer), as the generation stage names them."""
    ids: dict[str, tuple[str, str]] = {}
    for template in TEMPLATES:
        for i in range(max_count):
            content = f"{template.format(i=i + 1)} (tip {i + 1})"
            for kind in KINDS:
                candidate = llm_candidate(content, kind, None, "", "")
                ids[candidate.candidate_id] = (kind, content)
    return ids
