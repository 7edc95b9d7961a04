from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tipgraph.settings import RewardSettings, TipgraphSettings
from tipgraph.simulator import (
    expected_reward,
    make_request,
    make_users,
    p_done,
    run_local,
)

REWARDS = RewardSettings()


def test_users_differ_and_requests_are_valid_bodies() -> None:
    rng = np.random.default_rng(0)
    users = make_users(20, rng)
    assert len({u.favourites for u in users}) > 5
    request = make_request(users[0], 0, rng)
    assert len(request.body["tasks"]) == users[0].n_tasks
    assert 0 < p_done(request, "focus", None) < 1


def test_the_hidden_truth_leaves_a_real_gap_between_best_and_average() -> None:
    rng = np.random.default_rng(1)
    users = make_users(50, rng)
    gaps = []
    for i in range(300):
        request = make_request(users[i % 50], i, rng)
        values = [
            expected_reward(request, kind, None, REWARDS)
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
