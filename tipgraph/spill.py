"""One writer's write-ahead log on disk: its segments, the rows that wait only there, and
the replay of dead writers' segments (the files themselves: :mod:`tipgraph.wal`).

The decision log (:mod:`tipgraph.decision_log`) keeps rows in memory up to a bound and
hands the rest to :meth:`SpillLog.append` with ``disk_only``; under ``durable`` it also
appends every row (``sync``) before the answer.  Rows that wait only on disk form *runs*:
every line from a run's first row on is disk-only until the run is read back, so reading a
segment never duplicates a row that is also in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

from tipgraph.wal import (
    SEGMENT_SUFFIX,
    Chunk,
    Entry,
    Segment,
    claim_orphan,
    encode,
    orphan_candidates,
    read_chunk,
)

logger = logging.getLogger(__name__)

ROTATE_BYTES = 8 << 20
"""A segment this large is retired (deleted once its rows are written) for a fresh one."""


class SpillFailed(Exception):
    """A line could not be written to the local log (disk full, read-only)."""


class SpillLog:
    def __init__(self, directory: Path, owner: str) -> None:
        self.directory = directory
        self.owner = owner
        self._segment: Segment | None = None
        self._retired: list[tuple[Segment, int]] = []  # (segment, last row number in it)
        self._disk: deque[tuple[Segment, int]] = deque()  # (segment, read offset) of runs
        self.disk_rows = 0
        """Rows waiting only on disk, not in memory."""
        self._to_sync: list[tuple[Segment, str, asyncio.Future[None]]] = []
        self._syncing: asyncio.Task[None] | None = None

    @property
    def size(self) -> int:
        """Bytes of this writer's segments still on disk."""
        return sum(s.size for s in self._segments())

    def _segments(self) -> list[Segment]:
        return [s for s, _ in self._retired] + ([self._segment] if self._segment else [])

    def own_paths(self) -> set[Path]:
        return {s.path for s in self._segments()}

    def _active(self, row_number: int) -> Segment:
        if self._segment is not None and self._segment.broken:
            self._retired.append((self._segment, row_number))
            self._segment = None
        if self._segment is None:
            name = f"{self.owner}-{os.getpid()}-{uuid.uuid4().hex[:12]}{SEGMENT_SUFFIX}"
            self._segment = Segment(self.directory / name)
        return self._segment

    # -- appending -------------------------------------------------------------------------------
    async def append(self, entry: Entry, row_number: int, *, disk_only: bool, sync: bool) -> None:
        """Write ``entry`` (the ``row_number``-th row accepted); with ``sync`` it is on disk
        when this returns, with ``disk_only`` it waits here until :meth:`read_back`.
        Raises :class:`SpillFailed`, and then the row is not in the log at all."""
        try:
            line = encode(entry)
            segment = self._active(row_number)
        except (OSError, TypeError, ValueError) as err:
            raise SpillFailed(f"cannot write the local decision log: {err}") from err
        offset = segment.reserve(line)
        if disk_only:  # noted now, so rows accepted meanwhile queue behind it
            if not self._disk or self._disk[-1][0] is not segment:
                self._disk.append((segment, offset))
            self.disk_rows += 1
        try:
            if sync:
                await self._group_commit(segment, line)
            else:
                try:
                    segment.append([line], sync=False)
                except OSError as err:
                    raise SpillFailed(f"cannot write the local decision log: {err}") from err
        except SpillFailed:
            if disk_only:  # it never reached the file: nothing to read back
                self.disk_rows -= 1
            raise

    async def _group_commit(self, segment: Segment, line: str) -> None:
        # Every row that arrives while an fsync runs shares the next one.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_sync.append((segment, line, future))
        if self._syncing is None or self._syncing.done():
            self._syncing = asyncio.get_running_loop().create_task(self._sync_pending())
        await future

    @property
    def syncing(self) -> bool:
        return self._syncing is not None and not self._syncing.done()

    async def _sync_pending(self) -> None:
        while self._to_sync:
            segment = self._to_sync[0][0]
            batch = [item for item in self._to_sync if item[0] is segment]
            self._to_sync = [item for item in self._to_sync if item[0] is not segment]
            if segment.broken:  # their reserved offsets no longer hold: fail them too
                error: Exception | None = SpillFailed("the local log segment failed earlier")
            else:
                try:
                    lines = [line for _, line, _ in batch]
                    await asyncio.to_thread(segment.append, lines, sync=True)
                    error = None
                except (OSError, ValueError) as err:
                    error = SpillFailed(f"cannot write the local decision log: {err}")
            for _, _, future in batch:
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)

    async def sync(self) -> None:
        """fsync what ``buffered`` appends wrote since the last call."""
        if self._segment is not None:
            await asyncio.to_thread(self._segment.sync)

    # -- reading back ----------------------------------------------------------------------------
    def read_back(self, limit: int) -> Chunk | None:
        """The next disk-only rows, in order; None when there are none (or the next ones
        are reserved but not written yet)."""
        if not self._disk:
            return None
        segment, offset = self._disk[0]
        chunk = segment.read(offset, limit)
        self.disk_rows -= len(chunk.entries) + chunk.torn
        if self.disk_rows <= 0:
            self._disk.clear()
            self.disk_rows = 0
        elif (
            chunk.offset >= (segment.size if segment.broken else segment.end)
            and len(self._disk) == 1
        ):
            # Read to the end of the last run: what the count still says can never come.
            self._disk.clear()
            self.disk_rows = 0
        elif chunk.offset >= (segment.size if segment.broken else segment.end):
            self._disk.popleft()
        elif chunk.offset == offset:
            return None
        else:
            self._disk[0] = (segment, chunk.offset)
        return chunk

    def collect(self, handled: int, accepted: int) -> None:
        """Delete segments whose every row is handled (``handled`` of ``accepted`` rows are
        written or dead-lettered, in order); retire a large active one."""
        for old, last in list(self._retired):
            if handled > last and all(s is not old for s, _ in self._disk):
                old.delete()
                self._retired.remove((old, last))
        segment = self._segment
        if segment is None or any(s is segment for s, _ in self._disk):
            return
        if handled == accepted and segment.size > 0 and not self.syncing:
            segment.truncate()  # everything in it is written: start over, keep the lock
        elif segment.size >= ROTATE_BYTES:
            # Safe while an fsync runs: its rows are not handled yet, so the retired segment
            # stays until they are (and pending lines still go to it: they name it).
            self._retired.append((segment, accepted - 1))
            self._segment = None

    def close(self) -> None:
        for segment in self._segments():
            segment.delete()
        self._segment, self._retired = None, []

    # -- dead writers ----------------------------------------------------------------------------
    def replay_orphans(
        self, write: Callable[[list[Entry]], None], batch_size: int
    ) -> tuple[int, int]:
        """Claim every segment here whose writer is dead, ``write`` its rows in batches
        and delete it: (rows, torn lines).  StoreUnavailable from ``write`` propagates; the
        segment stays for the next try (the rows written meanwhile are written once)."""
        rows = torn = 0
        # Our own segments would refuse the lock anyway (flock conflicts between two
        # descriptors of one process too); leaving them out saves opening them.
        for path in orphan_candidates(self.directory, self.own_paths()):
            handle = claim_orphan(path)
            if handle is None:
                continue
            with handle:
                offset, found, skipped = 0, 0, 0
                while True:
                    chunk = read_chunk(handle, offset, batch_size)
                    skipped += chunk.torn
                    if chunk.entries:
                        write(chunk.entries)
                        found += len(chunk.entries)
                    if chunk.offset == offset:
                        break
                    offset = chunk.offset
                path.unlink(missing_ok=True)
            logger.warning(
                "decision log: replayed %d rows (%d torn lines skipped) of a dead writer (%s)",
                found,
                skipped,
                path.name,
            )
            rows, torn = rows + found, torn + skipped
        return rows, torn
