"""Writes decisions to the store off the request path, in batches, losing none and wedging on none.

The ingress hands each finished decision to :meth:`DecisionLog.submit`; a background task
writes what has accumulated every ``flush_interval_s``.  What the writer does with a failed
write depends on why it failed:

* **the data** (:class:`~tipgraph.store.RowRejected`, or a ValueError from validating a
  row: a constraint, a number out of range, a NaN): the batch is bisected until the refused
  rows are alone, every other row is written, and each refused row goes to the dead-letter
  file with its error.  A poison row never blocks another row;
* **anything else** (connection lost, database busy or read-only, the store closed, a bug):
  the rows are kept and the batch retried with backoff, so an outage delays rows, never
  drops them.

Rows wait in memory up to ``max_buffered``; past that they wait in this replica's
write-ahead log (:mod:`tipgraph.spill`, files in :mod:`tipgraph.wal`) and are read back
in order once memory has drained.  ``durability`` says when a decision is safe:

* ``buffered``: in memory when the answer leaves; the segment is fsynced at each flush.  A
  SIGKILL loses what was in memory, at most one flush interval of decisions in steady state
  (during an outage: up to ``max_buffered`` rows).
* ``durable``: appended to the segment and fsynced before the answer (group commit: one
  fsync for every decision that arrived meanwhile).  A SIGKILL loses nothing answered.

:meth:`DecisionLog.replay_orphans` (run when a replica starts, then every
``store.replay_interval_s``) claims the segments of dead writers in ``spill_dir`` (a dead
process's lock is gone) and replays them.  Past ``max_spill_bytes`` on disk the log stops
accepting (:class:`DecisionLogFull`, a 503) rather than lose rows.  Every insert is
idempotent (``ON CONFLICT DO NOTHING``), so a row retried or replayed twice is written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tipgraph.spill import SpillFailed, SpillLog
from tipgraph.store import DecisionStore, RowRejected
from tipgraph.store.records import (
    DecisionRecord,
    FeedbackRecord,
    PolicyScoresEntry,
    PolicyScoresRecord,
)
from tipgraph.wal import DEAD_LETTERS, DeadLetters, Entry

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0
Durability = Literal["buffered", "durable"]


class DecisionLogFull(Exception):
    """The log cannot take a row without risking it: the spill cap is reached, or (durable)
    the local log cannot be written.  The request is refused (503) instead."""


@dataclass(frozen=True)
class LogHealth:
    """What ``/readyz`` and the gauges report about one writer."""

    writer_alive: bool
    backlog: int
    spilled: int
    oldest_unwritten_s: float
    dead_lettered: int
    torn_lines: int
    replayed: int
    dropped_erased: int
    accepting: bool


def decision_log_problem(health: LogHealth, max_unwritten_age_s: float) -> str | None:
    """Why a replica with this writer should not take traffic, or None."""
    if not health.writer_alive:
        return "the decision-log writer has stopped"
    if not health.accepting:
        return "the decision log is full on disk: the database has been unreachable for long"
    if health.oldest_unwritten_s > max_unwritten_age_s:
        return (
            f"a decision has waited {health.oldest_unwritten_s:.0f}s to be written "
            f"(bound {max_unwritten_age_s:g}s)"
        )
    return None


class DecisionLog:
    def __init__(
        self,
        store: DecisionStore,
        *,
        flush_interval_s: float,
        batch_size: int,
        max_buffered: int,
        spill_dir: Path | None,
        owner: str,
        durability: Durability = "buffered",
        max_spill_bytes: int = 1 << 30,
    ) -> None:
        if durability == "durable" and spill_dir is None:
            raise ValueError("durable decision logging needs a spill_dir for its local log")
        self._store = store
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._max_buffered = max_buffered
        self.durability: Durability = durability
        self._max_spill_bytes = max_spill_bytes
        # Without a spill directory, memory is the only place rows can wait: never drop them.
        self._spill = SpillLog(spill_dir, owner) if spill_dir is not None else None
        self._dead = DeadLetters(spill_dir / DEAD_LETTERS, owner) if spill_dir else None
        self._queue: deque[Entry] = deque()  # rows in memory, FIFO; the spill holds the rest
        self._pending_ids: set[str] = set()
        self._submitted = 0
        self._handled = 0  # written or dead-lettered: always a prefix of the submitted rows
        self._refused = 0  # refused to the caller after counting: never written, any order
        self._marks: deque[tuple[int, float]] = deque()  # (first row number, monotonic time)
        self._counts = threading.Lock()  # the writer and the replay thread both count
        self.dead_lettered = 0
        self.torn_lines = 0
        self.replayed = 0
        self.shadows_dropped = 0
        self.dropped_erased = 0  # decisions of users erased before they were written
        self.held_submitted = 0  # held feedback accepted, ever
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- what callers read ---------------------------------------------------------------------
    @property
    def backlog(self) -> int:
        """Rows accepted but not yet written (or dead-lettered)."""
        return self._submitted - self._handled - self._refused

    @property
    def spilled(self) -> int:
        """Rows waiting on disk only (not in memory)."""
        return self._spill.disk_rows if self._spill is not None else 0

    @property
    def spill_bytes(self) -> int:
        """Bytes of this writer's write-ahead-log segments still on disk."""
        return self._spill.size if self._spill is not None else 0

    @property
    def accepting(self) -> bool:
        return self.spill_bytes < self._max_spill_bytes

    def health(self) -> LogHealth:
        return LogHealth(
            writer_alive=self._task is None or not self._task.done(),
            backlog=self.backlog,
            spilled=self.spilled,
            oldest_unwritten_s=self.oldest_unwritten_s(),
            dead_lettered=self.dead_lettered,
            torn_lines=self.torn_lines,
            replayed=self.replayed,
            dropped_erased=self.dropped_erased,
            accepting=self.accepting,
        )

    def oldest_unwritten_s(self) -> float:
        """Age of the oldest row not yet written; 0 when there is none.  Read-only: the
        metrics thread and /readyz call it while the writer prunes the marks."""
        if self.backlog <= 0:
            return 0.0
        oldest = None
        for first, at in list(self._marks):
            if first > self._handled:
                break
            oldest = at
        return 0.0 if oldest is None else time.monotonic() - oldest

    def _prune_marks(self) -> None:
        while len(self._marks) > 1 and self._marks[1][0] <= self._handled:
            self._marks.popleft()

    def is_pending(self, event_id: str) -> bool:
        return event_id in self._pending_ids

    # -- accepting rows --------------------------------------------------------------------------
    def _ensure_running(self) -> None:
        # Started lazily: the replica's constructor may run before its event loop does.
        if self._task is None:
            self._wake = asyncio.Event()
            self._progress = asyncio.Condition()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, decision: DecisionRecord) -> None:
        """Accept a decision; under ``durable`` it is on local disk when this returns.
        Raises :class:`DecisionLogFull` when it cannot be kept safely."""
        self._ensure_running()
        await self._accept(decision)
        self._pending_ids.add(decision.event_id)
        if len(self._queue) >= self._batch_size and self._wake is not None:
            self._wake.set()

    async def submit_policy_scores(
        self, event_id: str, runs: Sequence[PolicyScoresRecord], candidate_ids: Sequence[str]
    ) -> None:
        """Accept shadow scores; when the log is full they are dropped and counted (nobody
        was answered from them), never raised into the shadow path."""
        self._ensure_running()
        try:
            await self._accept(PolicyScoresEntry(event_id, runs, candidate_ids))
        except DecisionLogFull as err:
            self.shadows_dropped += 1
            logger.warning("decision log: shadow scores of %s dropped: %s", event_id, err)

    async def submit_held_feedback(self, feedback: FeedbackRecord) -> None:
        """Accept feedback whose decision cannot be read yet; it is written to the shared
        ``held_feedback`` table (durably, as a decision would be) and applied from there.
        Raises :class:`DecisionLogFull` like :meth:`submit`."""
        self._ensure_running()
        await self._accept(feedback)
        self.held_submitted += 1

    async def _accept(self, entry: Entry) -> None:
        if self._closing:
            raise DecisionLogFull("the decision log is closing: this replica is shutting down")
        if not self.accepting:
            raise DecisionLogFull(
                f"the decision log holds {self.spill_bytes} bytes on disk (cap "
                f"{self._max_spill_bytes}); the database has been unreachable for long"
            )
        row_number = self._submitted
        now = time.monotonic()
        if not self._marks or now - self._marks[-1][1] >= 0.1:
            self._marks.append((row_number, now))
        self._submitted += 1
        spill = self._spill
        disk_only = spill is not None and (
            spill.disk_rows > 0 or len(self._queue) >= self._max_buffered
        )
        if spill is not None and (disk_only or self.durability == "durable"):
            try:
                await spill.append(
                    entry, row_number, disk_only=disk_only, sync=self.durability == "durable"
                )
            except SpillFailed as err:
                await self._count(refused=1)  # refused to the caller: never written
                raise DecisionLogFull(str(err)) from err
        if not disk_only:
            self._queue.append(entry)

    # -- waiting for the writer ------------------------------------------------------------------
    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything submitted before the call is written (or dead-lettered);
        False if ``timeout_s`` passed first."""
        if self._task is None:
            return True
        target = self._submitted
        assert self._wake is not None and self._progress is not None
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s), self._progress:
                await self._progress.wait_for(lambda: self._handled + self._refused >= target)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._task is None:
            return
        await self.flush()
        self._closing = True  # from here on nothing is accepted
        assert self._wake is not None
        self._wake.set()
        await self._task
        self._task = None
        if self._spill is not None:
            self._spill.close()

    # -- the writer ------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wake is not None
        backoff = self._flush_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._flush_interval_s)
            self._wake.clear()
            try:
                written = await self._write_next()
            except Exception as err:
                # Not the data (that is dead-lettered): an outage, a closed store, a bug.
                # Keep every row, try again later; the writer never dies of it.
                logger.warning(
                    "decision log: write failed (%s: %s); %d rows kept, retrying in %.2fs",
                    type(err).__name__,
                    err,
                    self.backlog,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = self._flush_interval_s
            if self._closing and self.backlog == 0 and not self._spill_syncing():
                return
            if written:  # more may wait: go on without a full interval (never spin idle)
                self._wake.set()

    async def _write_next(self) -> int:
        """Write one batch from the front of the queue; the number of rows handled."""
        if self._spill is not None:
            self._refill(self._spill)
            if self.durability == "buffered":
                await self._spill.sync()
        batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
        if batch:
            await asyncio.to_thread(self._write_isolating, batch)
            for _ in batch:
                self._queue.popleft()
            self._pending_ids.difference_update(
                e.event_id for e in batch if isinstance(e, DecisionRecord)
            )
            await self._count(handled=len(batch))
        self._prune_marks()
        if self._spill is not None:
            self._spill.collect(self._handled, self._submitted)
        return len(batch)

    async def _count(self, *, handled: int = 0, refused: int = 0) -> None:
        assert self._progress is not None
        async with self._progress:
            self._handled += handled
            self._refused += refused
            self._progress.notify_all()

    def _spill_syncing(self) -> bool:
        return self._spill is not None and self._spill.syncing

    def _refill(self, spill: SpillLog) -> None:
        """Move rows waiting on disk into memory once memory has drained.  A torn line
        stands where its row was: counting it handled keeps the count in order."""
        while not self._queue:
            chunk = spill.read_back(min(self._batch_size, self._max_buffered))
            if chunk is None:
                return
            with self._counts:
                self.torn_lines += chunk.torn
            self._handled += chunk.torn
            self._queue.extend(chunk.entries)

    def _write_isolating(self, entries: list[Entry]) -> None:
        """Write ``entries``; rows the database refuses for good go to the dead letters.

        StoreUnavailable propagates (the caller retries the whole batch: inserts are
        idempotent, so the halves already written are written once).
        """
        decisions = [e for e in entries if isinstance(e, DecisionRecord)]
        shadows = [e for e in entries if isinstance(e, PolicyScoresEntry)]
        held = [e for e in entries if isinstance(e, FeedbackRecord)]
        try:
            dropped = self._store.write_batch(decisions, shadows, held)
        except (RowRejected, ValueError) as err:
            if len(entries) == 1:
                self._dead_letter(entries[0], err)
                return
            middle = len(entries) // 2
            self._write_isolating(entries[:middle])
            self._write_isolating(entries[middle:])
            return
        with self._counts:
            self.dropped_erased += dropped

    def _dead_letter(self, entry: Entry, error: BaseException) -> None:
        with self._counts:
            self.dead_lettered += 1
        logger.error(
            "decision log: the store refused a row for good; dead-lettered (event %s): %s",
            entry.event_id,
            error,
        )
        if self._dead is None:
            return
        try:
            self._dead.add(entry, error)
        except OSError:
            logger.exception("cannot write the dead-letter file %s", self._dead.path)

    # -- replaying dead writers' segments ------------------------------------------------------
    def replay_orphans(self) -> int:
        """Claim and replay every segment in ``spill_dir`` whose writer is dead; the number
        of rows replayed.  Blocking: run it in a thread (:class:`tipgraph.periodic.Periodic`,
        every ``store.replay_interval_s``).  A store outage stops it with StoreUnavailable;
        the segment stays for the next try (the rows it wrote are written once anyway)."""
        if self._spill is None:
            return 0
        rows, torn = self._spill.replay_orphans(self._write_isolating, self._batch_size)
        with self._counts:
            self.replayed += rows
            self.torn_lines += torn
        return rows
