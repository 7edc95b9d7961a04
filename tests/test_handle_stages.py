"""The ingress's shadow path (deployments.ingress.HandleStages) with stand-in handles:
events queue per shadow, failures are counted, a shadow that cannot keep up is shed."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

import deployments.ingress as ingress
from deployments.ingress import HandleStages
from tipgraph.settings import HopSettings, HopsSettings


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
    return HandleStages(unused, unused, unused, shadows, hops)  # type: ignore[arg-type]


async def test_shadows_get_each_event_and_failures_are_reported() -> None:
    ok = Handle(lambda items: [None] * len(items))
    broken = Handle(lambda items: ["InjectedFault: no"] * len(items))
    failures: list[tuple[str, str]] = []
    hop = stages({"ok": ok, "broken": broken})
    hop.on_shadow_failure = lambda name, error: failures.append((name, error))
    X = np.zeros((3, 4))
    assert hop.shadow_scores(X, "e1", ["a", "b", "c"], "b") == []  # nothing for the caller
    await hop.drain_shadows()
    # The served pick travels along: the shadow counts its agreement with it.
    assert [item[1:] for item in ok.shadow_batch.calls[0]] == [("e1", ["a", "b", "c"], "b")]
    assert failures == [("broken", "InjectedFault: no")]


async def test_a_failed_call_counts_as_a_failure_of_every_event_in_it() -> None:
    def crash(items: list[Any]) -> list[Any]:
        raise ConnectionError("replica died")

    failures: list[tuple[str, str]] = []
    hop = stages({"dead": Handle(crash)})
    hop.on_shadow_failure = lambda name, error: failures.append((name, error))
    for event in ("e1", "e2"):
        hop.shadow_scores(np.zeros((2, 4)), event, ["a", "b"], "a")
    await hop.drain_shadows()
    assert failures == [("dead", "ConnectionError: replica died")] * 2


async def test_a_shadow_that_cannot_keep_up_is_shed_not_queued(monkeypatch: Any) -> None:
    monkeypatch.setattr(ingress, "MAX_SHADOW_INFLIGHT", 3)
    stuck = Handle(lambda items: [None] * len(items))
    stuck.shadow_batch.release.clear()
    hop = stages({"stuck": stuck}, linger_s=5)
    for n in range(5):
        hop.shadow_scores(np.zeros((1, 4)), f"e{n}", ["a"], "a")
    assert hop.shadows_shed == 2  # three queued, two skipped and counted
    stuck.shadow_batch.release.set()
    await hop.drain_shadows()
    assert [len(call) for call in stuck.shadow_batch.calls] == [3]
