from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tipgraph import simulated_tips
from tipgraph.policy_comparison import RunResult, regain_decisions
from tipgraph.settings import RewardSettings, TipgraphSettings
from tipgraph.simulator import (
    Truth,
    expected_reward,
    make_request,
    make_users,
    p_done,
    revisit,
    run_local,
)

REWARDS = RewardSettings()


def test_users_differ_and_requests_are_valid_bodies() -> None:
    rng = np.random.default_rng(0)
    users = make_users(20, rng)
    assert len({u.favourites for u in users}) > 5
    request = make_request(users[0], 0, rng)
    assert len(request.body["tasks"]) == users[0].n_tasks
    assert 0 < p_done(request, Truth("focus")) < 1


def test_the_drift_scenario_turns_the_habits_around_and_regain_is_measured() -> None:
    rng = np.random.default_rng(2)
    user = make_users(1, rng)[0]
    request = make_request(user, 0, rng)
    drifted = replace(request, drifted=True)
    assert p_done(drifted, Truth("break_down")) > p_done(request, Truth("break_down"))
    assert p_done(drifted, Truth("focus")) < p_done(request, Truth("focus"))
    # regain: the first k whose next window earns `share` of the oracle.
    served = np.array([1.0] * 10 + [0.5] * 10 + [0.95] * 30)
    result = RunResult("p", 0, served, np.ones(50), np.full(50, 0.5))
    assert regain_decisions(result, 10, window=5, share=0.9) == 10  # [20, 25)
    assert regain_decisions(result, 10, window=5, share=0.99) is None


def test_the_hidden_truth_leaves_a_real_gap_between_best_and_average() -> None:
    rng = np.random.default_rng(1)
    users = make_users(50, rng)
    gaps = []
    for i in range(300):
        request = make_request(users[i % 50], i, rng)
        values = [
            expected_reward(request, Truth(kind), REWARDS)
            for kind in ("focus", "overdue", "due_today", "batch", "plan_day", "break_down")
        ]
        gaps.append(max(values) - float(np.mean(values)))
    assert np.mean(gaps) > 0.25  # a policy that learns has plenty to gain over uniform


@pytest.mark.parametrize(
    ("policy", "learns"),
    [({"kind": "linucb", "alpha": 0.5}, True), ({"kind": "uniform"}, False)],
)
def test_policy_learns_in_process_and_uniform_does_not(
    tmp_path: Path, policy: dict[str, object], learns: bool
) -> None:
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{tmp_path}/sim.db"}, policy={"name": "served", **policy}
    )
    blocks = run_local(settings, users=20, decisions=1500, seed=7, block=500)
    assert [b.last for b in blocks] == [500, 1000, 1500]
    assert all(b.errors == 0 for b in blocks)
    last = blocks[-1]
    assert last.uniform < last.oracle
    if learns:
        assert last.served > last.uniform + 0.15
        assert last.served > blocks[0].served
    else:
        assert abs(last.served - last.uniform) < 0.06


def test_cli_in_process_simulation_and_policy_comparison(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tipgraph_ops.cli import main

    root = Path(__file__).resolve().parent.parent
    assert (
        main(
            [
                "--config",
                str(root / "configs" / "tipgraph.yaml"),
                "simulate",
                "--in-process",
                "--store-url",
                f"sqlite:///{tmp_path}/sim.db",
                "--users",
                "3",
                "--decisions",
                "20",
                "--block",
                "10",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "in process" in out and "decisions     11-20" in out

    assert (
        main(
            [
                "compare-policies",
                "--policies",
                str(root / "configs" / "policies.yaml"),
                "--only",
                "linucb,uniform",
                "--seeds",
                "2",
                "--decisions",
                "300",
                "--last",
                "100",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")}
    assert {"oracle", "uniform (expected)", "linucb", "uniform"} <= rows
    assert (
        main(
            [
                "compare-policies",
                "--policies",
                str(root / "configs" / "policies.yaml"),
                "--only",
                "nope",
            ]
        )
        == 2
    )


def test_a_returning_user_keeps_the_task_list_at_a_new_time() -> None:
    rng = np.random.default_rng(3)
    user = make_users(1, rng)[0]
    first = make_request(user, 0, rng)
    again = revisit(first, 1, rng)
    assert again.body["tasks"] == first.body["tasks"] and again.body["now"] != first.body["now"]


def test_llm_tips_are_worth_their_hidden_quality() -> None:
    rng = np.random.default_rng(4)
    request = make_request(make_users(1, rng)[0], 0, rng)
    good = simulated_tips.hidden_quality("Set a timer for 10 minutes and finish the first step.")
    bad = simulated_tips.hidden_quality("Plan your day: pick the three things that matter.")
    assert good > 0 > bad
    assert p_done(request, Truth("focus", quality=good)) > p_done(
        request, Truth("focus", quality=bad)
    )


def test_the_candidate_pool_serves_returning_users_in_process(tmp_path: Path) -> None:
    llm = simulated_tips.SimulatedModels()
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{tmp_path}/sim.db"},
        generation={"source": "mixed", "serve_from": "pool", "prompts_dir": "configs/prompts"},
    )
    blocks = run_local(settings, users=5, decisions=200, seed=1, block=200, task_churn=0.1, llm=llm)
    assert blocks[0].errors == 0
    # Misses are first visits and changed task lists only: far fewer generations than tips.
    assert 5 <= llm.generations < 60 and llm.judgements == llm.generations
    assert llm.embeddings >= 1
