"""Writes decisions to the store off the request path, in batches, losing nothing on close.

The ingress hands each finished decision to :meth:`DecisionLog.submit` and answers at once;
a background task writes what has accumulated every ``flush_interval_s``.  A failed write
keeps its rows and is retried with backoff, so a database hiccup delays rows but never
drops them.  :meth:`close` (called from the replica's graceful shutdown) drains everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tipgraph.store import DecisionStore
from tipgraph.store.records import DecisionRecord, PolicyScoresRecord

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class _ShadowRows:
    event_id: str
    runs: Sequence[PolicyScoresRecord]
    candidate_ids: Sequence[str]


class DecisionLog:
    def __init__(
        self, store: DecisionStore, *, flush_interval_s: float = 0.05, batch_size: int = 256
    ) -> None:
        self._store = store
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._decisions: list[DecisionRecord] = []
        self._shadows: list[_ShadowRows] = []
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
        self._decisions.append(decision)
        self._pending_ids.add(decision.event_id)
        self._submitted += 1
        if len(self._decisions) >= self._batch_size and self._wake is not None:
            self._wake.set()

    def submit_policy_scores(
        self, event_id: str, runs: Sequence[PolicyScoresRecord], candidate_ids: Sequence[str]
    ) -> None:
        self._ensure_running()
        self._shadows.append(_ShadowRows(event_id, runs, candidate_ids))
        self._submitted += 1

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

    def _write(self, decisions: list[DecisionRecord], shadows: list[_ShadowRows]) -> None:
        if decisions:
            self._store.write_decisions(decisions)
        for rows in shadows:
            self._store.write_policy_scores(rows.event_id, rows.runs, rows.candidate_ids)
