"""The ingress's shadow path (deployments.ingress.HandleStages under the one
tipgraph.shadows.ShadowRunner) with stand-in handles: events queue for the one shadows
deployment, each shadow's failures are counted, shadows that cannot keep up are shed, all by
the runner that counts in process too."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

import deployments.ingress as ingress
from deployments.ingress import HandleStages
from tipgraph.metrics import Metrics
from tipgraph.settings import HopSettings, HopsSettings
from tipgraph.shadows import ShadowRunner


class Method:
    def __init__(self, answer: Any) -> None:
        self.calls: list[list[Any]] = []
        self.answer = answer
        self.release = asyncio.Event()
        self.release.set()

    async def remote(self, items: list[Any]) -> Any:
        self.calls.append(items)
        await self.release.wait()
        return self.answer(items)


class Handle:
    def __init__(self, answer: Any) -> None:
        self.shadow_batch = Method(answer)
        self.build_batch = self.generate_batch = self.score_batch = Method(answer)
        self.learn_batch = Method(lambda items: [True for _ in items])


def stages(shadows: Handle, names: list[str], linger_s: float = 0.0) -> HandleStages:
    unused = Handle(lambda items: [])
    hops = HopsSettings(shadows=HopSettings(linger_s=linger_s))
    return HandleStages(unused, unused, unused, shadows, names, hops, hops.generation)  # type: ignore[arg-type]


async def settle(hop: HandleStages) -> None:
    await hop.drain_shadows()
    await asyncio.sleep(0)  # the runner counts in the answers' done callbacks


async def test_shadows_get_each_event_in_one_call_and_failures_are_counted_per_shadow() -> None:
    shadows = Handle(lambda items: [{"ok": None, "broken": "InjectedFault: no"} for _ in items])
    hop = stages(shadows, ["ok", "broken"], linger_s=5)
    runner = ShadowRunner(hop, Metrics())
    runner.start(np.zeros((3, 4)), "e1", ["a", "b", "c"], "b")
    runner.start(np.zeros((2, 4)), "e2", ["a", "b"], "a")
    await settle(hop)
    # One call for both events and both shadows; the served pick travels along: each
    # shadow counts its agreement with it.
    assert [[item[1:] for item in call] for call in shadows.shadow_batch.calls] == [
        [("e1", ["a", "b", "c"], "b"), ("e2", ["a", "b"], "a")]
    ]
    assert runner.failures == {"broken": 2} and runner.shed == 0


async def test_a_shadow_missing_from_the_answer_counts_as_failing() -> None:
    # A shadows replica of another release (a shadow renamed, say) answers for others.
    hop = stages(Handle(lambda items: [{"old": None} for _ in items]), ["new"])
    runner = ShadowRunner(hop, Metrics())
    runner.start(np.zeros((1, 4)), "e1", ["a"], "a")
    await settle(hop)
    assert runner.failures == {"new": 1}


async def test_no_shadows_send_nothing() -> None:
    unused = Handle(lambda items: [])
    hops = HopsSettings()
    hop = HandleStages(unused, unused, unused, None, [], hops, hops.generation)  # type: ignore[arg-type]
    assert hop.shadow_scores(np.zeros((1, 4)), "e1", ["a"], "a") == []
    assert hop.learn_shadows(1, [0.0], 1.0, 0.0) == []
    assert "shadows" not in hop.batch_sizes()


async def test_a_failed_call_counts_as_a_failure_of_every_event_in_it() -> None:
    def crash(items: list[Any]) -> list[Any]:
        raise ConnectionError("replica died")

    hop = stages(Handle(crash), ["egreedy", "uniform"])
    runner = ShadowRunner(hop, Metrics())
    for event in ("e1", "e2"):
        runner.start(np.zeros((2, 4)), event, ["a", "b"], "a")
    await settle(hop)
    assert runner.failures == {"egreedy": 2, "uniform": 2}


async def test_a_shadow_that_cannot_keep_up_is_shed_not_queued(monkeypatch: Any) -> None:
    monkeypatch.setattr(ingress, "MAX_SHADOW_INFLIGHT", 3)
    stuck = Handle(lambda items: [{"s1": None, "s2": None} for _ in items])
    stuck.shadow_batch.release.clear()
    hop = stages(stuck, ["s1", "s2"], linger_s=5)
    runner = ShadowRunner(hop, Metrics())
    for n in range(5):
        runner.start(np.zeros((1, 4)), f"e{n}", ["a"], "a")
    await asyncio.sleep(0)
    # Three queued; two events skipped, for each shadow, and counted by the one counter.
    assert runner.shed == 2 * 2
    stuck.shadow_batch.release.set()
    await settle(hop)
    assert [len(call) for call in stuck.shadow_batch.calls] == [3]
    assert runner.failures == {}


async def test_concurrent_feedback_learns_in_one_call_per_deployment() -> None:
    scoring, shadows = Handle(lambda items: []), Handle(lambda items: [])
    hops = HopsSettings()
    hop = HandleStages(scoring, scoring, scoring, shadows, ["s"], hops, hops.generation)  # type: ignore[arg-type]
    scoring.learn_batch.release.clear()  # the first call stays out: the rest queue behind
    shadows.learn_batch.release.clear()
    rewards = [(i, [0.5], 1.0, 100.0 + i) for i in range(1, 6)]
    served = [asyncio.ensure_future(hop.learn(*r)) for r in rewards]
    learning = [f for r in rewards for f in hop.learn_shadows(*r)]
    await asyncio.sleep(0)
    scoring.learn_batch.release.set()
    shadows.learn_batch.release.set()
    await asyncio.gather(*served, *learning)
    # max_inflight_batches calls out at once, the rest in one: never a call per reward.
    inflight = hops.scoring.max_inflight_batches
    for handle in (scoring, shadows):
        calls = handle.learn_batch.calls
        assert [len(c) for c in calls] == [1] * inflight + [len(rewards) - inflight]
        assert sorted(item for call in calls for item in call) == rewards
