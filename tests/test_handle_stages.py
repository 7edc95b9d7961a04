"""The ingress's shadow path (deployments.ingress.HandleStages under the one
tipgraph.shadows.ShadowRunner) with stand-in handles: events queue per shadow, failures are
counted, a shadow that cannot keep up is shed, all by the runner that counts in process too."""

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


def stages(shadows: dict[str, Handle], linger_s: float = 0.0) -> HandleStages:
    unused = Handle(lambda items: [])
    hops = HopsSettings(shadows=HopSettings(linger_s=linger_s))
    return HandleStages(unused, unused, unused, shadows, hops, hops.generation)  # type: ignore[arg-type]


async def settle(hop: HandleStages) -> None:
    await hop.drain_shadows()
    await asyncio.sleep(0)  # the runner counts in the answers' done callbacks


async def test_shadows_get_each_event_and_failures_are_counted() -> None:
    ok = Handle(lambda items: [None] * len(items))
    broken = Handle(lambda items: ["InjectedFault: no"] * len(items))
    hop = stages({"ok": ok, "broken": broken})
    runner = ShadowRunner(hop, Metrics())
    runner.start(np.zeros((3, 4)), "e1", ["a", "b", "c"], "b")
    await settle(hop)
    # The served pick travels along: the shadow counts its agreement with it.
    assert [item[1:] for item in ok.shadow_batch.calls[0]] == [("e1", ["a", "b", "c"], "b")]
    assert runner.failures == {"broken": 1} and runner.shed == 0


async def test_a_failed_call_counts_as_a_failure_of_every_event_in_it() -> None:
    def crash(items: list[Any]) -> list[Any]:
        raise ConnectionError("replica died")

    hop = stages({"dead": Handle(crash)})
    runner = ShadowRunner(hop, Metrics())
    for event in ("e1", "e2"):
        runner.start(np.zeros((2, 4)), event, ["a", "b"], "a")
    await settle(hop)
    assert runner.failures == {"dead": 2}


async def test_a_shadow_that_cannot_keep_up_is_shed_not_queued(monkeypatch: Any) -> None:
    monkeypatch.setattr(ingress, "MAX_SHADOW_INFLIGHT", 3)
    stuck = Handle(lambda items: [None] * len(items))
    stuck.shadow_batch.release.clear()
    hop = stages({"stuck": stuck}, linger_s=5)
    runner = ShadowRunner(hop, Metrics())
    for n in range(5):
        runner.start(np.zeros((1, 4)), f"e{n}", ["a"], "a")
    await asyncio.sleep(0)
    assert runner.shed == 2  # three queued, two skipped and counted by the one counter
    stuck.shadow_batch.release.set()
    await settle(hop)
    assert [len(call) for call in stuck.shadow_batch.calls] == [3]
    assert runner.failures == {}
