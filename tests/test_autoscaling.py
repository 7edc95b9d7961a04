"""What the items-driven stages show Serve's autoscaler (tipgraph.autoscaling)."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ray import cloudpickle
from ray.serve.config import AutoscalingConfig

import tipgraph.autoscaling
from tipgraph.autoscaling import ITEMS_METRIC, ItemLoad, scale_on_items
from tipgraph.serve_config import all_deployment_options
from tipgraph.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_item_load_reports_the_time_weighted_mean_since_the_last_report() -> None:
    clock = Clock()
    load = ItemLoad(clock)
    with load.holding(4):  # 4 items for 1 s
        clock.now += 1.0
        with load.holding(8):  # then 12 for 1 s
            clock.now += 1.0
    clock.now += 2.0  # then none for 2 s
    assert load.report() == {ITEMS_METRIC: pytest.approx((4 + 12) / 4)}
    assert load.items == 0
    clock.now += 1.0
    assert load.report() == {ITEMS_METRIC: 0.0}  # a new window


def test_item_load_counts_items_still_inside_at_the_report() -> None:
    clock = Clock()
    load = ItemLoad(clock)
    with load.holding(3):
        clock.now += 2.0
        assert load.report() == {ITEMS_METRIC: pytest.approx(3.0)}
        clock.now += 1.0
        assert load.report() == {ITEMS_METRIC: pytest.approx(3.0)}
    assert load.items == 0


def test_item_load_releases_items_when_the_work_fails() -> None:
    load = ItemLoad(Clock())
    with pytest.raises(RuntimeError), load.holding(5):
        raise RuntimeError("LLM down")
    assert load.items == 0


@dataclass
class Context:
    """The fields of Ray's AutoscalingContext the policy reads."""

    current_num_replicas: int
    aggregated_metrics: dict[str, dict[str, float]]
    total_queued_requests: float = 0.0
    target_num_replicas: int = 1
    config: Any = field(default_factory=lambda: AutoscalingConfig(target_ongoing_requests=4))


def test_replicas_follow_items_not_batches() -> None:
    # One batch of 14 items in replica a and 2 items in b: Serve's own count would be 2.
    ctx = Context(2, {ITEMS_METRIC: {"a": 14.0, "b": 2.0}})
    desired, state = scale_on_items(ctx)
    assert desired == pytest.approx(16 / 4)
    assert state == {"items": 16.0}


def test_requests_queued_at_handles_count_as_items() -> None:
    ctx = Context(1, {ITEMS_METRIC: {"a": 4.0}}, total_queued_requests=8)
    assert scale_on_items(ctx)[0] == pytest.approx(3.0)


def test_an_idle_stage_asks_for_no_replica_and_serve_bounds_it() -> None:
    assert scale_on_items(Context(2, {ITEMS_METRIC: {"a": 0.0, "b": 0.0}}))[0] == 0.0


def test_a_replica_that_has_not_reported_yet_keeps_the_stage_from_shrinking() -> None:
    ctx = Context(3, {ITEMS_METRIC: {"a": 1.0, "b": 1.0}})
    assert scale_on_items(ctx)[0] == 3.0
    ctx = Context(3, {ITEMS_METRIC: {"a": 20.0, "b": 1.0}})
    assert scale_on_items(ctx)[0] == pytest.approx(21 / 4)


def test_at_zero_replicas_the_policy_defers_to_serves_target() -> None:
    assert scale_on_items(Context(0, {}, target_num_replicas=2)) == (2, {})


def test_serve_takes_the_rendered_policy_and_ships_it_by_value() -> None:
    settings = load_settings(ROOT / "configs/tipgraph.yaml")
    rendered = all_deployment_options(settings)["generation"]["autoscaling_config"]
    assert rendered["policy"] == {"policy_function": tipgraph.autoscaling.POLICY_FUNCTION}
    config = AutoscalingConfig(**rendered)
    config.policy.serialize_policy()
    # What the controller gets: the function from cloudpickled bytes, by value.
    policy = cloudpickle.loads(config.policy.get_serialized_policy_def())
    target = rendered["target_ongoing_requests"]
    ctx = Context(1, {ITEMS_METRIC: {"a": 3 * target}}, config=config)
    assert policy(ctx) == (pytest.approx(3.0), {"items": 3 * target})


def test_only_stages_that_wait_on_io_scale_on_items() -> None:
    options = all_deployment_options(load_settings(ROOT / "configs/tipgraph.yaml"))
    on_items = {name for name, o in options.items() if "policy" in o["autoscaling_config"]}
    assert on_items == {"context", "generation"}


def test_the_policy_module_imports_only_the_standard_library() -> None:
    # Serve pickles the module by value into its controller, which has no tipgraph.
    tree = ast.parse(Path(tipgraph.autoscaling.__file__).read_text())
    imported = {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    } | {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert imported <= {"__future__", "time", "collections", "contextlib", "typing"}
