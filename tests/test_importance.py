"""Feature-group importance: the served configuration's value with each group left out."""

from __future__ import annotations

import pytest

from tipgraph.settings import EpsilonGreedySettings, LinUCBSettings, UniformSettings
from tuning.config import EvaluationSettings
from tuning.importance import ALL_GROUPS, GroupImportance, feature_importance
from tuning.simulated_log import simulate_log


@pytest.fixture(scope="module")
def importance() -> dict[str | None, GroupImportance]:
    log, _ = simulate_log(EpsilonGreedySettings(name="log", epsilon=0.2), n_events=3000, seed=3)
    rows = feature_importance(LinUCBSettings(name="linucb", alpha=0.5), log, EvaluationSettings())
    return {row.left_out: row for row in rows}


def test_the_served_configuration_comes_first_then_every_group_left_out(
    importance: dict[str | None, GroupImportance],
) -> None:
    assert list(importance) == [None, *ALL_GROUPS]


def test_the_group_the_simulated_truth_rests_on_matters_and_absent_ones_do_not(
    importance: dict[str | None, GroupImportance],
) -> None:
    """The simulator's users act on their favourite kinds, which the history block (past
    reward per kind) reveals; task-mode logs have no LLM quality or embedding."""
    served = importance[None].estimate
    history = importance["history"]
    assert history.change == min(g.change for g in importance.values())
    assert history.estimate.upper < served.lower
    for absent in ("quality", "embedding"):
        assert abs(importance[absent].change) < 0.005


def test_a_restricted_policy_leaves_out_only_its_own_groups_and_uniform_has_none() -> None:
    log, _ = simulate_log(EpsilonGreedySettings(name="log", epsilon=0.2), n_events=400, seed=4)
    restricted = LinUCBSettings(name="linucb", features=("kind", "history", "time"))
    rows = feature_importance(restricted, log, EvaluationSettings(estimator="snips"))
    assert [r.left_out for r in rows] == [None, "history", "kind", "time"]
    assert rows[0].estimate.name == "progressive snips"
    only = LinUCBSettings(name="linucb", features=("history",))
    assert [r.left_out for r in feature_importance(only, log, EvaluationSettings())] == [None]
    assert feature_importance(UniformSettings(name="u"), log, EvaluationSettings()) == []
