from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from tests.factories import NOW, task, tip_body
from tipgraph.contracts import RecentReaction, TipRequest
from tipgraph.features import (
    FEATURE_SPEC,
    PRIOR_REWARD,
    CandidateView,
    build_context,
    candidate_matrix,
    kind_stats,
    part_of_day,
)
from tipgraph.settings import RewardSettings
from tipgraph.store.records import ReactionHistoryItem

REWARDS = RewardSettings()


def context_for(**overrides: object) -> tuple[TipRequest, object]:
    request = TipRequest.model_validate(tip_body(**overrides))
    return request, build_context(request, [], REWARDS)


def test_spec_version_is_stable_and_tracks_names() -> None:
    assert FEATURE_SPEC.version == FEATURE_SPEC.version
    assert FEATURE_SPEC.version.startswith("v1-")
    assert len(FEATURE_SPEC.names) == FEATURE_SPEC.dim
    assert len(set(FEATURE_SPEC.names)) == FEATURE_SPEC.dim


@pytest.mark.parametrize(
    ("hour", "part"),
    [
        (5, "morning"),
        (11, "morning"),
        (12, "afternoon"),
        (17, "evening"),
        (22, "night"),
        (3, "night"),
    ],
)
def test_part_of_day(hour: int, part: str) -> None:
    assert part_of_day(hour) == part


def test_context_counts_overdue_due_today_and_priority() -> None:
    _, context = context_for()
    assert context.overdue == 1  # t5, two days ago
    assert context.due_today == 1  # t1, in three hours
    assert context.high_priority == 2  # t1 (4), t5 (3)
    assert context.vector[0] == 1.0
    assert context.vector[1] == 1.0  # morning
    assert context.tasks["t5"].overdue and not context.tasks["t5"].due_today
    assert context.tasks["t6"].age_days == pytest.approx(20.0)
    assert "Open tasks: 6" in context.prompt


def test_timezone_moves_the_local_hour() -> None:
    _, utc = context_for()
    _, tokyo = context_for(timezone="Asia/Tokyo")
    assert utc.local_hour == 9
    assert tokyo.local_hour == 18
    assert tokyo.vector[3] == 1.0  # evening in Tokyo


def test_date_only_due_today_is_not_overdue() -> None:
    midnight = datetime(2026, 3, 4, tzinfo=UTC).isoformat()
    _, context = context_for(tasks=[task("a", due=midnight)])
    assert context.tasks["a"].due_today and not context.tasks["a"].overdue


def test_kind_stats_smooth_towards_the_prior() -> None:
    history = [ReactionHistoryItem("focus", "done", 1.0, NOW)] * 8
    recent = [RecentReaction(kind="batch", reaction="dismiss")]
    stats = kind_stats(history, recent, REWARDS)
    assert stats["focus"].shown == 8
    assert stats["focus"].mean_reward == pytest.approx((8 + PRIOR_REWARD * 2) / 10)
    assert stats["batch"].mean_reward == pytest.approx(PRIOR_REWARD * 2 / 3)
    assert stats["plan_day"].mean_reward == pytest.approx(PRIOR_REWARD)


def test_candidate_matrix_places_context_in_the_kind_block() -> None:
    _, context = context_for()
    X = candidate_matrix(context, [CandidateView("focus", ("t1",)), CandidateView("plan_day", ())])
    n_ctx, n_kinds = len(context.vector), len(FEATURE_SPEC.kinds)
    assert X.shape == (2, FEATURE_SPEC.dim)
    focus, plan = FEATURE_SPEC.kinds.index("focus"), FEATURE_SPEC.kinds.index("plan_day")
    np.testing.assert_array_equal(X[0, focus : n_ctx * n_kinds : n_kinds], context.vector)
    # every other kind's block is zero for this candidate
    assert X[0, : n_ctx * n_kinds].sum() == pytest.approx(sum(context.vector))
    np.testing.assert_array_equal(X[1, plan : n_ctx * n_kinds : n_kinds], context.vector)
    tail = dict(zip(FEATURE_SPEC.candidate, X[0, n_ctx * n_kinds :], strict=True))
    assert tail["has_task"] == 1.0 and tail["task_priority"] == 1.0
    assert tail["task_due_today"] == 1.0 and tail["task_overdue"] == 0.0
    assert X[1, n_ctx * n_kinds + FEATURE_SPEC.candidate.index("has_task")] == 0.0
    assert np.isfinite(X).all()


def test_context_prompt_never_contains_task_text() -> None:
    request, context = context_for()
    for one in request.tasks:
        assert one.content not in context.prompt  # type: ignore[attr-defined]
