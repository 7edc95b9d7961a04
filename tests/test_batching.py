"""Batched hops (tipgraph.batching): how calls group, and how failures stay per item."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from tipgraph.batching import Coalescer, ItemFailure, StageError, gather_each, run_each


class Stage:
    """A remote stage stand-in that holds each batch until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def send(self, items: list[int]) -> Sequence[int | ItemFailure]:
        self.batches.append(list(items))
        await self.release.wait()
        return [ItemFailure(f"ValueError: bad {i}") if i < 0 else i * 10 for i in items]


def held(max_batch_size: int = 8, max_inflight: int = 1) -> tuple[Stage, Coalescer[int, int]]:
    """A hop whose stage holds every batch until ``stage.release`` is set."""
    stage = Stage()
    stage.release.clear()
    return stage, Coalescer(stage.send, max_batch_size=max_batch_size, max_inflight=max_inflight)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_idle_hop_sends_a_call_at_once_and_alone() -> None:
    stage = Stage()
    hop = Coalescer(stage.send, max_batch_size=8, max_inflight=1)
    assert await hop(1) == 10
    assert await hop(2) == 20
    assert stage.batches == [[1], [2]]
    assert hop.mean_batch_size == 1.0


async def test_calls_arriving_while_a_batch_is_out_travel_together() -> None:
    stage, hop = held()
    first = asyncio.ensure_future(hop(1))
    await settle()
    rest = [asyncio.ensure_future(hop(i)) for i in range(2, 7)]
    await settle()
    assert stage.batches == [[1]]  # the others wait for the slot
    stage.release.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [20, 30, 40, 50, 60]
    assert stage.batches == [[1], [2, 3, 4, 5, 6]]
    assert hop.mean_batch_size == 3.0


async def test_batches_never_exceed_the_size_limit_and_keep_order() -> None:
    stage, hop = held(max_batch_size=4)
    calls = [asyncio.ensure_future(hop(i)) for i in range(11)]
    await settle()
    stage.release.set()
    assert await asyncio.gather(*calls) == [i * 10 for i in range(11)]
    assert stage.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


async def test_more_slots_mean_more_batches_out_at_once() -> None:
    stage, hop = held(max_inflight=3)
    calls = [asyncio.ensure_future(hop(i)) for i in range(5)]
    await settle()
    assert stage.batches == [[0], [1], [2]]
    stage.release.set()
    await asyncio.gather(*calls)
    assert stage.batches[3:] == [[3, 4]]


async def test_one_failed_item_fails_only_its_own_call() -> None:
    stage, hop = held()
    blocker = asyncio.ensure_future(hop(0))
    await settle()
    calls = [asyncio.ensure_future(hop(i)) for i in (1, -2, 3)]
    await settle()
    stage.release.set()
    outcomes = await asyncio.gather(blocker, *calls, return_exceptions=True)
    assert outcomes[0] == 0 and outcomes[1] == 10 and outcomes[3] == 30
    assert isinstance(outcomes[2], StageError)
    assert str(outcomes[2]) == "ValueError: bad -2"


async def test_a_failed_call_fails_its_batch_and_the_next_batch_still_goes() -> None:
    attempts: list[list[int]] = []

    async def flaky(items: list[int]) -> list[int]:
        attempts.append(items)
        if len(attempts) == 1:
            raise ConnectionError("replica died")
        return items

    hop = Coalescer(flaky, max_batch_size=8, max_inflight=1)
    with pytest.raises(ConnectionError, match="replica died"):
        await hop(1)
    assert await hop(2) == 2


async def test_a_stage_answering_the_wrong_number_of_items_is_an_error() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    hop = Coalescer(short, max_batch_size=8, max_inflight=1)
    with pytest.raises(StageError, match="answered 0 items for 1"):
        await hop(1)


async def test_a_caller_that_went_away_is_not_sent() -> None:
    stage, hop = held()
    blocker = asyncio.ensure_future(hop(0))
    await settle()
    gone = asyncio.ensure_future(hop(1))
    kept = asyncio.ensure_future(hop(2))
    await settle()
    gone.cancel()
    await settle()
    stage.release.set()
    assert (await blocker, await kept) == (0, 20)
    assert stage.batches == [[0], [2]]


@pytest.mark.parametrize(("size", "inflight"), [(0, 1), (1, 0)])
def test_limits_below_one_are_refused(size: int, inflight: int) -> None:
    async def send(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="must be >= 1"):
        Coalescer(send, max_batch_size=size, max_inflight=inflight)


def test_run_each_turns_each_exception_into_that_items_failure() -> None:
    assert run_each(lambda x: 10 // x, [5, 0, 2]) == [
        2,
        ItemFailure("ZeroDivisionError: integer division or modulo by zero"),
        5,
    ]


async def test_gather_each_runs_calls_concurrently_and_keeps_failures_per_item() -> None:
    started: list[int] = []

    async def call(x: int) -> int:
        started.append(x)
        await asyncio.sleep(0.01)
        if x == 2:
            raise RuntimeError("no")
        return x

    outcomes = await gather_each(call(x) for x in (1, 2, 3))
    assert outcomes == [1, ItemFailure("RuntimeError: no"), 3]
    assert started == [1, 2, 3]


async def test_a_lingering_hop_collects_until_its_oldest_call_has_waited() -> None:
    stage = Stage()
    hop = Coalescer(stage.send, max_batch_size=8, max_inflight=1, linger_s=0.05)
    first, second = hop.submit(1), hop.submit(2)
    await asyncio.sleep(0.01)
    assert stage.batches == []  # nobody waits on a lingering hop: it holds the batch
    assert await asyncio.gather(first, second) == [10, 20]
    assert stage.batches == [[1, 2]]


async def test_a_full_batch_does_not_linger() -> None:
    stage = Stage()
    hop = Coalescer(stage.send, max_batch_size=2, max_inflight=1, linger_s=10)
    calls = [hop.submit(i) for i in range(3)]
    assert await asyncio.gather(*calls[:2]) == [0, 10]
    assert stage.batches == [[0, 1]]  # [2] lingers on; drain sends it
    await hop.drain()
    assert calls[2].result() == 20 and stage.batches == [[0, 1], [2]]


class ReplicaGone(Exception):
    pass


async def test_a_call_whose_replica_died_is_sent_again() -> None:
    sent: list[list[int]] = []

    async def send(items: list[int]) -> list[int]:
        sent.append(items)
        if len(sent) < 3:
            raise ReplicaGone("actor died")
        return [i * 10 for i in items]

    hop = Coalescer(send, max_batch_size=8, max_inflight=1, retry_on=(ReplicaGone,), retries=2)
    assert await hop(4) == 40
    assert sent == [[4], [4], [4]] and hop.retried == 2


async def test_retries_give_up_and_other_errors_are_not_retried() -> None:
    calls = 0

    async def send(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        raise ReplicaGone("actor died") if calls < 10 else ValueError("bad")

    hop = Coalescer(send, max_batch_size=8, max_inflight=1, retry_on=(ReplicaGone,), retries=1)
    with pytest.raises(ReplicaGone):
        await hop(1)
    assert calls == 2
    calls = 9
    with pytest.raises(ValueError):
        await hop(2)
    assert calls == 10  # not retried
