"""Batched hops: many requests' calls to one stage travel as one remote call.

A call between Serve replicas costs about 1 ms of CPU on each side (routing, gRPC,
pickling, the replica's request bookkeeping) whatever it carries, while a stage's own work
here is tens of microseconds.  So the ingress groups concurrent calls to a stage
(:class:`Coalescer`) and the stage answers the whole list (:func:`run_each`,
:func:`gather_each`), one result or :class:`ItemFailure` per item, so one bad item never
fails its neighbours.

Batching is *natural*: nothing waits for a batch to fill.  A call goes out at once while
fewer than ``max_inflight`` batches are out; otherwise it waits for the next free slot,
which takes everything queued by then (up to ``max_batch_size``).  An idle graph sends
each request alone, and a busy one sends larger batches: the same adaptive rule as group
commit in databases.

A call that fails as a whole because its replica died can be sent again
(``retry_on``): Serve routes the retry to a live replica.  Only for stages whose calls are
safe to repeat (context reads, generation, scoring: nothing is written there).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
RETRY_BACKOFF_S = 0.1
"""Before the first retry of a failed call; the second waits twice as long."""


@dataclass(frozen=True)
class ItemFailure:
    """One item of a batch failed; travels back in its place as plain text (a library's
    exception may not pickle across a Ray boundary)."""

    error: str


class StageError(RuntimeError):
    """A stage failed on this item (the others of its batch may have succeeded)."""


def _failure(err: BaseException) -> ItemFailure:
    return ItemFailure(f"{type(err).__name__}: {err}"[:500])


def run_each(function: Callable[[T], R], items: Iterable[T]) -> list[R | ItemFailure]:
    """``function`` on every item; an item's exception becomes its ItemFailure."""
    results: list[R | ItemFailure] = []
    for item in items:
        try:
            results.append(function(item))
        except Exception as err:
            results.append(_failure(err))
    return results


async def gather_each(calls: Iterable[Awaitable[R]]) -> list[R | ItemFailure]:
    """Await every call concurrently; an item's exception becomes its ItemFailure."""
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    return [_failure(o) if isinstance(o, BaseException) else o for o in outcomes]


class Coalescer(Generic[T, R]):
    """Turns concurrent ``await coalescer(item)`` calls into batched ``send(items)`` calls.

    ``send`` returns one ``R`` or :class:`ItemFailure` per item, in order.  A failure of the
    whole call (the replica died, the batch could not be delivered) fails every item in it.
    """

    def __init__(
        self,
        send: Callable[[list[T]], Awaitable[Sequence[R | ItemFailure]]],
        *,
        max_batch_size: int,
        max_inflight: int,
        linger_s: float = 0.0,
        retry_on: tuple[type[BaseException], ...] = (),
        retries: int = 0,
    ) -> None:
        if max_batch_size < 1 or max_inflight < 1:
            raise ValueError(
                f"max_batch_size and max_inflight must be >= 1, got {max_batch_size} "
                f"and {max_inflight}"
            )
        self._send = send
        self._max_batch_size = max_batch_size
        self._max_inflight = max_inflight
        self._linger_s = linger_s
        self._retry_on = retry_on
        self._retries = retries
        self.retried = 0
        self._queue: deque[tuple[T, asyncio.Future[R], float]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0

    async def __call__(self, item: T) -> R:
        return await self.submit(item)

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue the item now (or send it, if a slot is free); the future gets its result.
        Cancelling the future before its batch leaves keeps the item out of the batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future, loop.time()))
        self._dispatch()
        return future

    async def drain(self) -> None:
        """Send everything queued now, without lingering, and wait for every call out."""
        self._linger_s = 0.0
        self._dispatch()
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    @property
    def queued(self) -> int:
        """Calls waiting for a batch (not counting those already out)."""
        return len(self._queue)

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def _dispatch(self) -> None:
        while self._queue and self._inflight < self._max_inflight:
            if self._lingering():
                return
            batch: list[tuple[T, asyncio.Future[R]]] = []
            while self._queue and len(batch) < self._max_batch_size:
                item, future, _ = self._queue.popleft()
                if not future.done():  # its caller went away (client disconnected)
                    batch.append((item, future))
            if not batch:
                return
            self._inflight += 1
            self.batches += 1
            self.items += len(batch)
            task = asyncio.ensure_future(self._deliver(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _lingering(self) -> bool:
        """With ``linger_s``, a batch that is not full waits until its oldest item has
        waited that long (for hops nobody waits on, like shadows: fewer, larger calls)."""
        if not self._linger_s or len(self._queue) >= self._max_batch_size:
            return False
        loop = asyncio.get_running_loop()
        delay = self._queue[0][2] + self._linger_s - loop.time()
        if delay <= 0:
            return False
        if self._timer is None:
            self._timer = loop.call_later(delay, self._linger_over)
        return True

    def _linger_over(self) -> None:
        self._timer = None
        self._dispatch()

    async def _send_retrying(self, items: list[T]) -> Sequence[R | ItemFailure]:
        """``send``, again up to ``retries`` times when the whole call fails with one of
        ``retry_on`` (the replica died: for a stage whose calls are safe to repeat)."""
        for attempt in range(self._retries):
            try:
                return await self._send(items)
            except self._retry_on as err:
                self.retried += 1
                logger.warning("sending a batch of %d again: %s", len(items), _failure(err).error)
                await asyncio.sleep(RETRY_BACKOFF_S * (attempt + 1))
        return await self._send(items)

    async def _deliver(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._send_retrying([item for item, _ in batch])
            if len(results) != len(batch):
                raise StageError(f"a stage answered {len(results)} items for {len(batch)}")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as err:
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, ItemFailure):
                    future.set_exception(StageError(result.error))
                else:
                    future.set_result(result)
        finally:
            self._inflight -= 1
            self._dispatch()
