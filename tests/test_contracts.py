from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from tests.factories import task, tip_body
from tipgraph.contracts import FeedbackRequest, TipRequest, check_limits
from tipgraph.settings import LimitSettings


def test_valid_request_parses_with_defaults() -> None:
    request = TipRequest.model_validate(tip_body())
    assert request.timezone == "UTC"
    assert request.tasks[0].priority == 4
    assert request.tasks[1].priority == 1  # default
    assert request.local_now().hour == 9


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tasks": []}, "at least 1"),
        ({"timezone": "Mars/Olympus"}, "unknown IANA timezone"),
        ({"tasks": [task("a", priority=5)]}, "less than or equal to 4"),
        ({"tasks": [task("a", priority="high")]}, "valid integer"),
        ({"tasks": [task("a", content="")]}, "at least 1 character"),
        ({"tasks": [task("a", content="x" * 2001)]}, "at most 2000 characters"),
        ({"tasks": [task("a", content="bad\x00byte")]}, "control character U\\+0000"),
        ({"tasks": [task("a"), task("a")]}, "appears more than once"),
        ({"tasks": [task("a", due="1970-01-01T00:00:00Z")]}, "year 1970 is outside"),
        ({"tasks": [task("a", prioirty=2)]}, "Extra inputs are not permitted"),
        ({"n_candidates": 0}, "greater than or equal to 1"),
        ({"n_candidates": 51}, "less than or equal to 50"),
        ({"user_id": ""}, "at least 1 character"),
        ({"tasks": [task(str(i)) for i in range(501)]}, "at most 500 items"),
    ],
)
def test_bad_tip_requests_name_the_problem(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TipRequest.model_validate(tip_body(**change))


def test_unicode_content_is_kept() -> None:
    request = TipRequest.model_validate(tip_body(tasks=[task("a", "Geburtstag 🎂 planen, Ärger")]))
    assert request.tasks[0].content == "Geburtstag 🎂 planen, Ärger"


def test_configured_limits_can_only_tighten() -> None:
    request = TipRequest.model_validate(tip_body())
    assert check_limits(request, LimitSettings()) is None
    assert check_limits(request, LimitSettings(max_tasks=3)) == "tasks: at most 3 tasks, got 6"
    message = check_limits(request, LimitSettings(max_content_chars=10))
    assert message is not None and message.startswith("tasks[0].content: at most 10")
    labelled = TipRequest.model_validate(
        tip_body(
            tasks=[task("a", labels=["x", "y", "z"])],
            recent_reactions=[{"kind": "focus", "reaction": "done"}] * 3,
        )
    )
    assert check_limits(labelled, LimitSettings(max_labels=3, max_recent_reactions=3)) is None
    assert check_limits(labelled, LimitSettings(max_labels=2)) == (
        "tasks[0].labels: at most 2 labels, got 3"
    )
    assert check_limits(labelled, LimitSettings(max_recent_reactions=2)) == (
        "recent_reactions: at most 2, got 3"
    )


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"event_id": "e", "reaction": "love"}, "'done', 'snooze' or 'dismiss'"),
        ({"event_id": "e", "reaction": "done", "value": float("nan")}, "finite number"),
        ({"event_id": "e", "reaction": "done", "value": float("inf")}, "finite number"),
        ({"reaction": "done"}, "Field required"),
    ],
)
def test_bad_feedback_is_rejected(body: dict[str, Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        FeedbackRequest.model_validate(body)
