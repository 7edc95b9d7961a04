"""The HTTP API's request and response bodies.

Validation happens here, once, at the boundary: everything inside the graph trusts these
models.  Limits are module constants so the error message can name them; the settings in
``configs/`` may only tighten them (see :func:`check_limits`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from tipgraph.settings import LimitSettings, Reaction, TipKind
from tipgraph.text import unsafe_character

MAX_TASKS = 500
MAX_CONTENT_CHARS = 2000
MAX_LABELS = 20
MAX_RECENT_REACTIONS = 200
MAX_CANDIDATES = 50
MAX_ID_CHARS = 200
# Dates outside this window are almost certainly client bugs (epoch zero, year 9999).
MIN_YEAR, MAX_YEAR = 2000, 2200

ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]+$"
"""Ids travel into prompts, logs and the store: no control characters or bidi overrides."""
Identifier = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=MAX_ID_CHARS, strip_whitespace=True, pattern=ID_PATTERN
    ),
]
TIP_KINDS: tuple[str, ...] = TipKind.__args__  # type: ignore[attr-defined]


class _Body(BaseModel):
    # Unknown fields are an error: a misspelled "prioirty" must not be silently dropped.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _check_year(value: datetime | None) -> datetime | None:
    if value is not None and not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValueError(f"year {value.year} is outside {MIN_YEAR}..{MAX_YEAR}")
    return value


def _clean_text(value: str) -> str:
    # Controls, bidi overrides and lone surrogates break logs, prompts and the store.
    bad = unsafe_character(value)
    if bad is not None:
        raise ValueError(f"contains control character {bad} (C0/C1, bidi or lone surrogate)")
    return value


class Task(_Body):
    id: Identifier
    content: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTENT_CHARS)]
    priority: int = Field(1, ge=1, le=4, description="1 = normal ... 4 = urgent (Todoist)")
    due: datetime | None = None
    labels: list[Annotated[str, StringConstraints(max_length=100)]] = Field(
        default_factory=list, max_length=MAX_LABELS
    )
    created_at: datetime | None = None
    project_id: Identifier | None = None

    _years = field_validator("due", "created_at")(_check_year)
    _text = field_validator("content")(_clean_text)


class RecentReaction(_Body):
    kind: TipKind
    reaction: Reaction
    at: datetime | None = None

    _years = field_validator("at")(_check_year)


class TipRequest(_Body):
    user_id: Identifier
    now: datetime | None = Field(None, description="Defaults to the server's clock (UTC)")
    timezone: str = Field("UTC", max_length=64, description="IANA name, e.g. Europe/Berlin")
    tasks: list[Task] = Field(..., min_length=1, max_length=MAX_TASKS)
    recent_reactions: list[RecentReaction] = Field(
        default_factory=list, max_length=MAX_RECENT_REACTIONS
    )
    n_candidates: int | None = Field(None, ge=1, le=MAX_CANDIDATES)
    exclude_ids: list[Identifier] = Field(default_factory=list, max_length=MAX_TASKS)

    _years = field_validator("now")(_check_year)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"unknown IANA timezone {value!r}") from err
        return value

    @field_validator("tasks")
    @classmethod
    def _unique_task_ids(cls, tasks: list[Task]) -> list[Task]:
        seen: set[str] = set()
        for task in tasks:
            if task.id in seen:
                raise ValueError(f"task id {task.id!r} appears more than once")
            seen.add(task.id)
        return tasks

    def local_now(self) -> datetime:
        """``now`` (or the clock) as an aware datetime in the user's timezone."""
        now = self.now or datetime.now(UTC)
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        return now.astimezone(ZoneInfo(self.timezone))


class Tip(BaseModel):
    candidate_id: str
    content: str
    kind: str
    source: str
    task_id: str | None = None
    model: str | None = None
    prompt_version: str | None = None


class RankedCandidate(BaseModel):
    candidate_id: str
    score: float
    probability: float


class PolicyInfo(BaseModel):
    name: str
    version: str


class StageLatency(BaseModel):
    context: float
    generation: float
    scoring: float
    total: float


class TipResponse(BaseModel):
    event_id: str
    tip: Tip
    probability: float
    policy: PolicyInfo
    ranking: list[RankedCandidate]
    latency_ms: StageLatency


class FeedbackRequest(_Body):
    event_id: Identifier
    reaction: Reaction
    value: float | None = Field(
        None, description="Explicit reward overriding the reaction's mapped reward"
    )
    at: datetime | None = None

    _years = field_validator("at")(_check_year)


class FeedbackResponse(BaseModel):
    event_id: str
    reaction: str
    reward: float
    reacted_at: datetime
    learned: bool = Field(
        description="False when the feedback came after the reward wait: stored, not learned"
    )
    status: Literal["applied", "pending"] = Field(
        "applied",
        description="pending (HTTP 202): the decision is not readable yet (still being written, "
        "or the database is down); the feedback is held and applied once it is",
    )


class UserErasure(BaseModel):
    """What ``DELETE /v1/users/{user_id}`` removed. Learned statistics are kept."""

    decisions_erased: int
    feedback_erased: int
    pending_writes: int = Field(
        0,
        description="This replica's decisions still waiting to be written when the erasure "
        "ran; the user's among them are dropped when they arrive (the erasure is tombstoned)",
    )


class ErrorResponse(BaseModel):
    detail: str


def check_limits(request: TipRequest, limits: LimitSettings) -> str | None:
    """The first configured limit the request breaks, as a message, or None.

    The model's constants are hard ceilings; configured limits can only be tighter.
    """
    if len(request.tasks) > limits.max_tasks:
        return f"tasks: at most {limits.max_tasks} tasks, got {len(request.tasks)}"
    for index, task in enumerate(request.tasks):
        if len(task.content) > limits.max_content_chars:
            return (
                f"tasks[{index}].content: at most {limits.max_content_chars} characters, "
                f"got {len(task.content)}"
            )
        if len(task.labels) > limits.max_labels:
            return (
                f"tasks[{index}].labels: at most {limits.max_labels} labels, got {len(task.labels)}"
            )
    if len(request.recent_reactions) > limits.max_recent_reactions:
        return (
            f"recent_reactions: at most {limits.max_recent_reactions}, "
            f"got {len(request.recent_reactions)}"
        )
    if request.n_candidates is not None and request.n_candidates > limits.max_candidates:
        return f"n_candidates: at most {limits.max_candidates}, got {request.n_candidates}"
    return None
