"""Synthetic users with a hidden ground truth, to watch a policy learn.

Each user has hidden tastes: a couple of favourite tip kinds, a part of the day when
planning tips land, and a soft spot for tips about urgent tasks.  The probability that a
user marks a tip *done* is a logistic function of those tastes; otherwise they snooze or
dismiss.  Everything a good policy needs is observable through the features (kind × part
of day, the user's past reward per kind, task priority), so learning is possible, and a
uniform policy only earns the average.

LLM tips (with ``llm=SimulatedModels()``, or a graph whose LLM is the Ollama stub) also
have a hidden quality (:mod:`tipgraph.simulated_tips`) that replaces the task-urgency term:
the judge barely sees it, the tip's embedding reveals it.  With ``task_churn`` below 1,
users come back with the same task list (each visit keeps it with probability
``1 - task_churn``), which is what lets a candidate pool serve them.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import numpy as np

from tipgraph import simulated_tips
from tipgraph.candidates import task_candidates
from tipgraph.contracts import MAX_CANDIDATES, TIP_KINDS, FeedbackRequest, TipRequest
from tipgraph.features import build_context, part_of_day
from tipgraph.local import LocalStages
from tipgraph.metrics import Metrics
from tipgraph.settings import RewardSettings, TipgraphSettings
from tipgraph.wiring import tip_service

BASE_LOGIT = -1.6
FAVOURITE_BONUS = 2.6
DISLIKE_PENALTY = -1.0
SNOOZE_SHARE = 0.4
LLM_QUALITY_WEIGHT = 2.0  # logit per unit of an LLM tip's hidden quality, in [-1, 1]
START = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday

# Time-of-day patterns shared by everyone: plan in the morning, sweep small things at night.
TIME_BONUS: dict[tuple[str, str], float] = {
    ("plan_day", "morning"): 1.6,
    ("plan_day", "evening"): -1.2,
    ("plan_day", "night"): -1.2,
    ("batch", "evening"): 1.2,
    ("focus", "afternoon"): 0.8,
    ("break_down", "morning"): 0.5,
}
# The drift scenario's patterns from its drift point on: the habits turn around (plans at
# night, sprints in the morning) and breaking tasks down becomes what everyone wants
# while focus sessions fall out of favour.  A model that weighs the old evidence as much
# as the new keeps recommending the old habits.
DRIFTED_TIME_BONUS: dict[tuple[str, str], float] = {
    ("plan_day", "morning"): -1.6,
    ("plan_day", "evening"): 1.6,
    ("plan_day", "night"): 1.2,
    ("batch", "morning"): 1.2,
    ("batch", "evening"): -1.2,
    **{("break_down", part): 1.5 for part in ("morning", "afternoon", "evening", "night")},
    **{("focus", part): -1.5 for part in ("morning", "afternoon", "evening", "night")},
}
TASK_WORDS = (
    "email",
    "report",
    "invoice",
    "groceries",
    "gym",
    "call mom",
    "dentist",
    "taxes",
    "slides",
    "review PR",
    "laundry",
    "budget",
    "book flights",
    "write blog post",
    "fix bike",
    "water plants",
)


@dataclass(frozen=True)
class SimUser:
    user_id: str
    favourites: tuple[str, ...]
    dislikes: tuple[str, ...]
    urgency_bonus: float
    timezone: str
    n_tasks: int


@dataclass(frozen=True)
class SimRequest:
    user: SimUser
    body: dict[str, Any]
    priorities: dict[str, int]
    overdue: set[str]
    part: str
    drifted: bool = False
    """After the drift scenario's drift point: :data:`DRIFTED_TIME_BONUS` applies."""


def request_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(requests, reactions) generators for one simulation seed."""
    return np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])


def make_users(n: int, rng: np.random.Generator) -> list[SimUser]:
    users = []
    for i in range(n):
        kinds = list(rng.permutation(TIP_KINDS))
        users.append(
            SimUser(
                user_id=f"sim-user-{i:04d}",
                favourites=tuple(kinds[:2]),
                dislikes=tuple(kinds[2:4]),
                urgency_bonus=float(rng.uniform(0.0, 1.2)),
                timezone="UTC",
                n_tasks=int(rng.integers(5, 14)),
            )
        )
    return users


def make_request(user: SimUser, decision: int, rng: np.random.Generator) -> SimRequest:
    """A tip request at a random local time with a fresh task list for ``user``."""
    now = START + timedelta(days=int(decision // 200), hours=float(rng.uniform(6, 24)))
    tasks = []
    priorities: dict[str, int] = {}
    overdue: set[str] = set()
    for j in range(user.n_tasks):
        task_id = f"{user.user_id}-t{j}"
        word = TASK_WORDS[int(rng.integers(len(TASK_WORDS)))]
        long = rng.random() < 0.25
        content = (
            f"{word}: prepare everything, check the details twice and follow up afterwards"
            if long
            else word
        )
        priority = int(rng.choice([1, 1, 2, 3, 4]))
        due_roll = rng.random()
        due = None
        if due_roll < 0.2:
            due = now - timedelta(days=int(rng.integers(1, 5)))
            overdue.add(task_id)
        elif due_roll < 0.4:
            due = now.replace(hour=23, minute=0, second=0, microsecond=0)
        elif due_roll < 0.6:
            due = now + timedelta(days=int(rng.integers(2, 10)))
        tasks.append(
            {
                "id": task_id,
                "content": content,
                "priority": priority,
                "due": due.isoformat() if due else None,
                "created_at": (now - timedelta(days=int(rng.integers(0, 30)))).isoformat(),
            }
        )
        priorities[task_id] = priority
    body = {
        "user_id": user.user_id,
        "now": now.isoformat(),
        "timezone": user.timezone,
        "tasks": tasks,
    }
    return SimRequest(user, body, priorities, overdue, part_of_day(now.hour))


def revisit(previous: SimRequest, decision: int, rng: np.random.Generator) -> SimRequest:
    """The same user with the same task list, at a new random local time."""
    now = START + timedelta(days=int(decision // 200), hours=float(rng.uniform(6, 24)))
    body = {**previous.body, "now": now.isoformat()}
    return SimRequest(
        previous.user, body, previous.priorities, previous.overdue, part_of_day(now.hour)
    )


@dataclass(frozen=True)
class Truth:
    """What decides a candidate's hidden value: a task tip's kind and task, or an LLM
    tip's kind and hidden quality."""

    kind: str
    task_id: str | None = None
    quality: float | None = None


def p_done(request: SimRequest, truth: Truth) -> float:
    """The hidden probability that this user marks this tip done."""
    user = request.user
    pattern = DRIFTED_TIME_BONUS if request.drifted else TIME_BONUS
    logit = BASE_LOGIT + pattern.get((truth.kind, request.part), 0.0)
    if truth.kind in user.favourites:
        logit += FAVOURITE_BONUS
    if truth.kind in user.dislikes:
        logit += DISLIKE_PENALTY
    if truth.quality is not None:
        logit += LLM_QUALITY_WEIGHT * truth.quality
    elif truth.task_id is not None:
        logit += user.urgency_bonus * (request.priorities.get(truth.task_id, 1) - 1) / 3
    return 1.0 / (1.0 + math.exp(-logit))


def expected_reward(request: SimRequest, truth: Truth, rewards: RewardSettings) -> float:
    p = p_done(request, truth)
    rest = SNOOZE_SHARE * rewards.snooze + (1 - SNOOZE_SHARE) * rewards.dismiss
    return p * rewards.done + (1 - p) * rest


def react(request: SimRequest, truth: Truth, rng: np.random.Generator) -> str:
    if rng.random() < p_done(request, truth):
        return "done"
    return "snooze" if rng.random() < SNOOZE_SHARE else "dismiss"


@dataclass
class Block:
    """Mean rewards over one block of decisions."""

    first: int
    last: int
    served: float
    uniform: float
    oracle: float
    errors: int


def run_http(
    url: str,
    *,
    users: int,
    decisions: int,
    seed: int,
    block: int = 500,
    rewards: RewardSettings | None = None,
    timeout_s: float = 30.0,
    on_block: Callable[[Block], None] | None = None,
    api_token: str | None = None,
    task_churn: float = 1.0,
) -> list[Block]:
    """Drive a running tipgraph over HTTP; returns the per-block mean rewards."""
    rewards = rewards or RewardSettings()
    headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers) as client:

        def tip(body: dict[str, Any]) -> dict[str, Any]:
            response = client.post("/v1/tips", json=body)
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

        def feedback(event_id: str, reaction: str) -> None:
            client.post(
                "/v1/feedback", json={"event_id": event_id, "reaction": reaction}
            ).raise_for_status()

        return list(
            _loop(
                tip,
                feedback,
                users=users,
                decisions=decisions,
                seed=seed,
                block=block,
                rewards=rewards,
                on_block=on_block,
                task_churn=task_churn,
            )
        )


def run_local(
    settings: TipgraphSettings,
    *,
    users: int,
    decisions: int,
    seed: int,
    block: int = 500,
    on_block: Callable[[Block], None] | None = None,
    task_churn: float = 1.0,
    llm: simulated_tips.SimulatedModels | None = None,
    metrics: Metrics | None = None,
) -> list[Block]:
    """The same loop with every stage in this process (no Ray, no HTTP).

    ``llm`` answers for the three model aliases (``generation.source`` llm or mixed);
    each refill of the candidate pool runs to its end before the next request, so runs
    are reproducible.
    """

    if settings.privacy.user_key_secret is None:
        # Simulated users, a throw-away log: no one to protect, so no key is required.
        privacy = settings.privacy.model_copy(update={"allow_dev_secret": True})
        settings = settings.model_copy(update={"privacy": privacy})
    loop = asyncio.new_event_loop()
    built: list[LocalStages] = []

    def stages(*wired: Any) -> LocalStages:
        completer, embed = (llm.complete, llm.embed) if llm is not None else (None, None)
        built.append(LocalStages(settings, *wired, completer=completer, embed=embed))
        return built[0]

    service = tip_service(settings, stages, owner="simulator", metrics=metrics)
    try:

        def tip(body: dict[str, Any]) -> dict[str, Any]:
            answer = loop.run_until_complete(service.tip(TipRequest.model_validate(body)))
            refills = built[0].refills
            if refills is not None:
                loop.run_until_complete(refills.join())
            return answer.model_dump(mode="json")

        def feedback(event_id: str, reaction: str) -> None:
            request = FeedbackRequest.model_validate({"event_id": event_id, "reaction": reaction})
            loop.run_until_complete(service.feedback(request))

        return list(
            _loop(
                tip,
                feedback,
                users=users,
                decisions=decisions,
                seed=seed,
                block=block,
                rewards=settings.rewards,
                on_block=on_block,
                task_churn=task_churn,
            )
        )
    finally:
        loop.run_until_complete(service.close())
        if built and built[0].refills is not None:
            loop.run_until_complete(built[0].refills.aclose())
        loop.close()
        service.store.close()


def _loop(
    tip: Callable[[dict[str, Any]], dict[str, Any]],
    feedback: Callable[[str, str], None],
    *,
    users: int,
    decisions: int,
    seed: int,
    block: int,
    rewards: RewardSettings,
    on_block: Callable[[Block], None] | None,
    task_churn: float = 1.0,
) -> Iterator[Block]:
    # Requests and reactions draw from separate streams, so every policy run with the same
    # seed meets exactly the same users, times and task lists.
    rng, reaction_rng = request_streams(seed)
    population = make_users(users, rng)
    last: dict[str, SimRequest] = {}
    served: list[float] = []
    uniform: list[float] = []
    oracle: list[float] = []
    errors = 0
    for i in range(decisions):
        user = population[int(rng.integers(users))]
        previous = last.get(user.user_id)
        # With task_churn 1 no draw is made: the stream is what it always was.
        if previous is not None and task_churn < 1.0 and rng.random() >= task_churn:
            request = revisit(previous, i, rng)
        else:
            request = make_request(user, i, rng)
        last[user.user_id] = request
        try:
            answer = tip(request.body)
        except Exception:
            errors += 1
        else:
            truth = _candidate_truth(request, rewards)
            chosen = answer["tip"]["candidate_id"]
            reaction = react(request, truth.get(chosen, _kind_only(chosen)), reaction_rng)
            feedback(answer["event_id"], reaction)
            served.append(rewards.reward_for(reaction))  # type: ignore[arg-type]
            values = [
                expected_reward(
                    request, truth.get(c["candidate_id"], _kind_only(c["candidate_id"])), rewards
                )
                for c in answer["ranking"]
            ]
            uniform.append(float(np.mean(values)))
            oracle.append(float(np.max(values)))
        if (i + 1) % block == 0 or i + 1 == decisions:
            result = Block(
                first=i + 2 - len(served) - errors,
                last=i + 1,
                served=float(np.mean(served)) if served else float("nan"),
                uniform=float(np.mean(uniform)) if uniform else float("nan"),
                oracle=float(np.mean(oracle)) if oracle else float("nan"),
                errors=errors,
            )
            if on_block:
                on_block(result)
            yield result
            served, uniform, oracle, errors = [], [], [], 0


def _candidate_truth(request: SimRequest, rewards: RewardSettings) -> dict[str, Truth]:
    """Candidate id -> its hidden truth, for every task-mode candidate of this request and
    every tip the simulated LLM can write.

    The response ranks candidate ids only; task mode is deterministic and the simulated
    LLM's tips are a finite set, so the simulator can tell what it was offered and score
    each candidate against the hidden truth.
    """
    tip_request = TipRequest.model_validate(request.body)
    context = build_context(tip_request, [], rewards)
    tasks = {
        c.candidate_id: Truth(c.kind, c.task_id)
        for c in task_candidates(tip_request, context, MAX_CANDIDATES)
    }
    return {**_llm_truth(), **tasks}


@functools.cache
def _llm_truth() -> dict[str, Truth]:
    return {
        candidate_id: Truth(kind, quality=simulated_tips.hidden_quality(content))
        for candidate_id, (kind, content) in simulated_tips.candidate_ids().items()
    }


def _kind_only(candidate_id: str) -> Truth:
    # Neither a task-mode candidate nor a simulated LLM tip: the id is "<kind>-<hash>".
    return Truth(candidate_id.rsplit("-", 1)[0])


def format_block(block: Block) -> str:
    return (
        f"decisions {block.first:>6}-{block.last:<6} mean reward {block.served:.3f}"
        f"  (uniform {block.uniform:.3f}, oracle {block.oracle:.3f})"
        + (f"  errors {block.errors}" if block.errors else "")
    )


def summarise(blocks: Sequence[Block]) -> str:
    if not blocks:
        return "no decisions"
    first, last = blocks[0], blocks[-1]
    return (
        f"first block mean reward {first.served:.3f}, last block {last.served:.3f} "
        f"(uniform ≈ {np.mean([b.uniform for b in blocks]):.3f}, "
        f"oracle ≈ {np.mean([b.oracle for b in blocks]):.3f})"
    )
