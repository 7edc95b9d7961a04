"""Writes decisions to the store off the request path, in batches, losing nothing on close.

The ingress hands each finished decision to :meth:`DecisionLog.submit` and answers at once;
a background task writes what has accumulated every ``flush_interval_s``.  A failed write
keeps its rows and is retried with backoff, so a database outage delays rows but never
drops them.  Memory stays bounded during a long outage: past ``max_buffered`` rows, new rows
are appended to a local spill file (JSON lines) and read back once the memory buffer has
drained.  Every insert is idempotent (``ON CONFLICT DO NOTHING``), so a batch retried after
a write whose acknowledgement was lost is still written exactly once.  :meth:`close`
(called from the replica's graceful shutdown) drains memory and the spill file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tipgraph.store import DecisionStore
from tipgraph.store.records import (
    CandidateRecord,
    DecisionRecord,
    PolicyScoresEntry,
    PolicyScoresRecord,
)

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0


Entry = DecisionRecord | PolicyScoresEntry


def _encode(entry: Entry) -> str:
    kind = "decision" if isinstance(entry, DecisionRecord) else "shadows"
    return json.dumps({"kind": kind, "row": dataclasses.asdict(entry)}, default=_json_default)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot spill {type(value).__name__}")


def _decode(line: str) -> Entry:
    data = json.loads(line)
    row: dict[str, Any] = data["row"]
    if data["kind"] == "shadows":
        runs = [PolicyScoresRecord(**run) for run in row["runs"]]
        return PolicyScoresEntry(row["event_id"], runs, row["candidate_ids"])
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    row["candidates"] = [CandidateRecord(**c) for c in row["candidates"]]
    row["served"] = PolicyScoresRecord(**row["served"])
    return DecisionRecord(**row)


class SpillFile:
    """Append-only JSON lines, read back in order from a cursor; emptied once all is read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending = 0
        self._offset = 0

    def append(self, entry: Entry) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(_encode(entry) + "\n")
        self.pending += 1

    def take(self, limit: int) -> list[Entry]:
        """Up to ``limit`` entries after the cursor; the cursor moves past them."""
        entries: list[Entry] = []
        with open(self.path, encoding="utf-8") as handle:
            handle.seek(self._offset)
            while len(entries) < limit:
                line = handle.readline()
                if not line:
                    break
                entries.append(_decode(line))
            self._offset = handle.tell()
        self.pending -= len(entries)
        if self.pending == 0:
            self.path.unlink(missing_ok=True)
            self._offset = 0
        return entries


class DecisionLog:
    def __init__(
        self,
        store: DecisionStore,
        *,
        flush_interval_s: float,
        batch_size: int,
        max_buffered: int,
        spill_path: Path | None = None,
    ) -> None:
        self._store = store
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._max_buffered = max_buffered
        # Without a spill file, memory is the only place rows can wait: never drop them.
        self._spill = SpillFile(spill_path) if spill_path is not None else None
        self._decisions: list[DecisionRecord] = []
        self._shadows: list[PolicyScoresEntry] = []
        self._pending_ids: set[str] = set()
        self._submitted = 0
        self._written = 0
        self._wake: asyncio.Event | None = None
        self._progress: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def backlog(self) -> int:
        """Rows accepted but not yet in the database."""
        return self._submitted - self._written

    @property
    def spilled(self) -> int:
        """Rows waiting in the spill file (not in memory)."""
        return self._spill.pending if self._spill is not None else 0

    @property
    def spill_bytes(self) -> int:
        """Size of the spill file; it is emptied only once every row in it is read back."""
        if self._spill is None:
            return 0
        try:
            return self._spill.path.stat().st_size
        except FileNotFoundError:
            return 0

    def _buffered(self) -> int:
        return len(self._decisions) + len(self._shadows)

    def _overflowing(self) -> bool:
        # Once anything waits on disk, later rows queue behind it there too.
        return self._spill is not None and (
            self._spill.pending > 0 or self._buffered() >= self._max_buffered
        )

    def is_pending(self, event_id: str) -> bool:
        return event_id in self._pending_ids

    def _ensure_running(self) -> None:
        # Started lazily: the replica's constructor may run before its event loop does.
        if self._task is None:
            self._wake = asyncio.Event()
            self._progress = asyncio.Condition()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, decision: DecisionRecord) -> None:
        self._ensure_running()
        self._enqueue(decision)
        self._pending_ids.add(decision.event_id)
        if len(self._decisions) >= self._batch_size and self._wake is not None:
            self._wake.set()

    def submit_policy_scores(
        self, event_id: str, runs: Sequence[PolicyScoresRecord], candidate_ids: Sequence[str]
    ) -> None:
        self._ensure_running()
        self._enqueue(PolicyScoresEntry(event_id, runs, candidate_ids))

    def _enqueue(self, entry: Entry) -> None:
        if self._overflowing():
            assert self._spill is not None
            try:
                self._spill.append(entry)
            except OSError:
                # A full or read-only disk must not lose the row: memory is the last resort.
                logger.exception("cannot spill to %s; keeping the row in memory", self._spill.path)
                self._keep(entry)
        else:
            self._keep(entry)
        self._submitted += 1

    def _keep(self, entry: Entry) -> None:
        if isinstance(entry, DecisionRecord):
            self._decisions.append(entry)
        else:
            self._shadows.append(entry)

    def _refill(self) -> None:
        """Move spilled rows back into memory once memory has drained."""
        if self._spill is None or self._spill.pending == 0 or self._buffered() > 0:
            return
        for entry in self._spill.take(min(self._batch_size, self._max_buffered)):
            self._keep(entry)

    async def flush(self) -> None:
        """Return once everything submitted before the call is in the database."""
        if self._task is None:
            return
        target = self._submitted
        assert self._wake is not None and self._progress is not None
        self._wake.set()
        async with self._progress:
            await self._progress.wait_for(lambda: self._written >= target)

    async def close(self) -> None:
        if self._task is None:
            return
        await self.flush()
        self._closing = True
        assert self._wake is not None
        self._wake.set()
        await self._task
        self._task = None

    async def _run(self) -> None:
        assert self._wake is not None and self._progress is not None
        backoff = self._flush_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._flush_interval_s)
            self._wake.clear()
            self._refill()
            decisions, shadows = self._decisions, self._shadows
            if not decisions and not shadows:
                if self._closing:
                    return
                continue
            self._decisions, self._shadows = [], []
            try:
                await asyncio.to_thread(self._write, decisions, shadows)
            except Exception:
                # Put the rows back in front and retry: a database outage delays, never drops.
                self._decisions[:0] = decisions
                self._shadows[:0] = shadows
                logger.exception(
                    "decision log write failed; %d rows kept, retrying in %.2fs",
                    len(decisions) + len(shadows),
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = self._flush_interval_s
            self._pending_ids.difference_update(d.event_id for d in decisions)
            async with self._progress:
                self._written += len(decisions) + len(shadows)
                self._progress.notify_all()
            if self.spilled:
                self._wake.set()  # drain the spill file without waiting a full interval

    def _write(self, decisions: list[DecisionRecord], shadows: list[PolicyScoresEntry]) -> None:
        self._store.write_batch(decisions, shadows)
