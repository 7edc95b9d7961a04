from __future__ import annotations

from collections import Counter

from tests.factories import task, tip_body
from tipgraph.candidates import task_candidates
from tipgraph.contracts import TipRequest
from tipgraph.features import build_context
from tipgraph.settings import RewardSettings


def candidates_for(n: int = 8, **overrides: object) -> list:
    request = TipRequest.model_validate(tip_body(**overrides))
    return task_candidates(request, build_context(request, [], RewardSettings()), n)


def test_candidates_are_deterministic_and_unique() -> None:
    first, second = candidates_for(), candidates_for()
    assert [c.candidate_id for c in first] == [c.candidate_id for c in second]
    # the fixture supports 7 distinct tips: 2 focus + 1 of each other kind
    assert len({c.candidate_id for c in first}) == len(first) == 7


def test_round_robin_covers_every_available_kind_first() -> None:
    kinds = [c.kind for c in candidates_for(n=6)]
    assert set(kinds) == {"focus", "overdue", "due_today", "batch", "plan_day", "break_down"}
    assert Counter(kinds).most_common(1)[0][1] == 1


def test_overdue_tip_is_about_the_overdue_task() -> None:
    overdue = [c for c in candidates_for() if c.kind == "overdue"]
    assert [c.task_id for c in overdue] == ["t5"]
    assert "Pay the electricity bill" in overdue[0].content


def test_batch_needs_three_small_tasks() -> None:
    kinds = {c.kind for c in candidates_for(tasks=[task("a", "email"), task("b", "gym")])}
    assert "batch" not in kinds
    assert "plan_day" in kinds


def test_excluded_tasks_never_appear() -> None:
    candidates = candidates_for(n=50, exclude_ids=["t1", "t5"])
    assert all(not {"t1", "t5"} & set(c.task_ids) for c in candidates)


def test_everything_excluded_gives_no_candidates() -> None:
    assert candidates_for(exclude_ids=["t1", "t2", "t3", "t4", "t5", "t6"]) == []


def test_n_caps_the_count() -> None:
    assert len(candidates_for(n=3)) == 3


def test_exclude_ids_also_removes_tips_already_shown() -> None:
    shown = candidates_for(n=2)
    rest = candidates_for(n=50, exclude_ids=[c.candidate_id for c in shown])
    assert not {c.candidate_id for c in shown} & {c.candidate_id for c in rest}
    assert len(rest) == 5
