from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from tests.factories import NOW, task, tip_body
from tipgraph import simulated_tips
from tipgraph.contracts import RecentReaction, TipRequest
from tipgraph.features import (
    FEATURE_SPEC,
    PRIOR_REWARD,
    CandidateView,
    FeatureSpec,
    UserContext,
    build_context,
    candidate_matrix,
    kind_stats,
    part_of_day,
)
from tipgraph.projection import PROJECTION, Projection, cosine
from tipgraph.settings import RewardSettings
from tipgraph.store.records import ReactionHistoryItem

REWARDS = RewardSettings()


def context_for(**overrides: object) -> tuple[TipRequest, object]:
    request = TipRequest.model_validate(tip_body(**overrides))
    return request, build_context(request, [], REWARDS)


def test_spec_version_is_stable_and_tracks_names() -> None:
    assert FEATURE_SPEC.version == FEATURE_SPEC.version
    assert FEATURE_SPEC.version.startswith("v2-")
    assert len(FEATURE_SPEC.names) == FEATURE_SPEC.dim
    assert len(set(FEATURE_SPEC.names)) == FEATURE_SPEC.dim
    # The projection's seed and size are part of the layout's name.
    other = Projection(PROJECTION.dim, PROJECTION.seed + 1)
    renamed = FeatureSpec(
        FEATURE_SPEC.context,
        FEATURE_SPEC.kinds,
        tuple(n.replace(PROJECTION.version, other.version) for n in FEATURE_SPEC.candidate),
    )
    assert renamed.version != FEATURE_SPEC.version


def _quality_block(context: UserContext, view: CandidateView) -> dict[str, float]:
    row = candidate_matrix(context, [view])[0]
    names = FEATURE_SPEC.names
    start = names.index("judge_score")
    return dict(zip(names[start:], row[start:], strict=True))


def test_tips_without_judge_or_embedding_get_zeros_and_indicators() -> None:
    request = TipRequest.model_validate(tip_body())
    context = build_context(request, [], RewardSettings())
    block = _quality_block(context, CandidateView("focus", ("t1",)))
    assert block.pop("judge_missing") == 1.0 and block.pop("embedding_missing") == 1.0
    assert set(block.values()) == {0.0}


def test_judge_score_embedding_and_similarity_to_dismissed_tips() -> None:
    request = TipRequest.model_validate(tip_body())
    dismissed = (PROJECTION(simulated_tips.embed("Plan your day: pick the three things")),)
    context = build_context(request, [], RewardSettings(), dismissed=dismissed)
    close = PROJECTION(simulated_tips.embed("Plan your day: pick the three things first"))
    far = PROJECTION(simulated_tips.embed("Set a timer for 10 minutes"))
    near_block = _quality_block(context, CandidateView("plan_day", (), 0.7, close))
    far_block = _quality_block(context, CandidateView("focus", (), None, far))
    assert near_block["judge_score"] == 0.7 and near_block["judge_missing"] == 0.0
    assert near_block["embedding_missing"] == 0.0
    assert near_block["dismissed_similarity"] > 0.8 > far_block["dismissed_similarity"]
    embedding = [v for k, v in near_block.items() if k.startswith("embedding_") and k[10].isdigit()]
    assert embedding == pytest.approx(list(close))
    # A candidate with a malformed embedding is treated as one without.
    broken = _quality_block(context, CandidateView("focus", (), None, (1.0, 2.0)))
    assert broken["embedding_missing"] == 1.0 and broken["dismissed_similarity"] == 0.0


def test_projection_is_seeded_unit_length_and_keeps_neighbours_close() -> None:
    a = simulated_tips.embed("Block 25 minutes for the report now")
    b = simulated_tips.embed("Block 25 minutes for the slides now")
    c = simulated_tips.embed("Maybe think about it someday")
    pa, pb, pc = PROJECTION(a), PROJECTION(b), PROJECTION(c)
    assert pa == PROJECTION(a) and len(pa) == PROJECTION.dim
    assert sum(x * x for x in pa) == pytest.approx(1.0)
    assert cosine(pa, pb) > cosine(pa, pc)
    assert Projection(PROJECTION.dim, 1)(a) != pa
    with pytest.raises(ValueError, match="finite"):
        PROJECTION([float("nan"), 1.0])


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
