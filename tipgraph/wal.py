"""The decision writer's files: write-ahead log segments and the dead-letter file.

A segment is JSON lines, one row each, written by one process and held under an exclusive
``flock`` for as long as that process has it open.  The kernel drops the lock when the
process dies, however it dies, so a segment nobody holds is an *orphan*: its writer is gone
and any replica may claim it (taking the lock itself) and replay it into the store.  Inserts
are idempotent, so a row replayed twice is written once.

A crash can leave the last line of a segment half-written.  Readers skip such *torn* lines
and count them instead of failing: one bad line must not cost the rest of the file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Collection, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tipgraph.store.records import (
    CandidateRecord,
    DecisionRecord,
    FeedbackRecord,
    PolicyScoresEntry,
    PolicyScoresRecord,
)

Entry = DecisionRecord | PolicyScoresEntry | FeedbackRecord
"""A decision, a policy's scores of one event, or feedback held for its decision."""
_KINDS = {DecisionRecord: "decision", PolicyScoresEntry: "shadows", FeedbackRecord: "held"}
SEGMENT_SUFFIX = ".wal"
LEGACY_SUFFIX = ".jsonl"
"""Spill files written before segments were locked; claimed and replayed the same way, but
only once untouched for ``LEGACY_QUIET_S``: their writer (an older release, during a rolling
upgrade) holds no lock that would say it is alive."""
LEGACY_QUIET_S = 3600.0
DEAD_LETTERS = "dead-letters.jsonl"


def encode(entry: Entry) -> str:
    row = dataclasses.asdict(entry)
    return json.dumps({"kind": _KINDS[type(entry)], "row": row}, default=_json_default)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def decode(line: str) -> Entry:
    """The row one line holds; ValueError (or KeyError/TypeError) for a damaged line.  A
    dead-letter line holds its row too, so a dead-letter file replays like a segment."""
    data = json.loads(line)
    if "entry" in data:
        data = data["entry"]
    row: dict[str, Any] = data["row"]
    if data["kind"] == "shadows":
        runs = [PolicyScoresRecord(**run) for run in row["runs"]]
        return PolicyScoresEntry(row["event_id"], runs, row["candidate_ids"])
    if data["kind"] == "held":
        for stamp in ("reacted_at", "received_at"):
            row[stamp] = datetime.fromisoformat(row[stamp])
        return FeedbackRecord(**row)
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    # Segments written before the compact log (schema 9) carry the context vector too;
    # every candidate's joint vector holds it, so nothing is lost without it.
    row.pop("context_features", None)
    row["candidates"] = [CandidateRecord(**c) for c in row["candidates"]]
    row["served"] = PolicyScoresRecord(**row["served"])
    return DecisionRecord(**row)


@dataclasses.dataclass
class Chunk:
    """What one read of a segment found."""

    entries: list[Entry]
    offset: int
    """Where the next read starts."""
    torn: int
    """Lines skipped: half-written by a crash, or not a row."""


def read_chunk(handle: Any, offset: int, limit: int, end: int | None = None) -> Chunk:
    """Up to ``limit`` rows from byte ``offset`` of an open binary file, not past ``end``."""
    handle.seek(offset)
    entries: list[Entry] = []
    torn = 0
    while len(entries) < limit and (end is None or offset < end):
        line = handle.readline() if end is None else handle.readline(end - offset)
        if not line:
            break
        if not line.endswith(b"\n"):
            # The writer died mid-line: nothing follows a torn line, so stop here.
            torn += 1
            offset += len(line)
            break
        offset += len(line)
        try:
            entries.append(decode(line.decode("utf-8")))
        except (ValueError, KeyError, TypeError):
            torn += 1
    return Chunk(entries, offset, torn)


class Segment:
    """One append-only segment, locked by this process until :meth:`delete`.

    ``reserve`` gives a line its offset when it is accepted; ``append`` writes reserved
    lines in the same order (possibly in a thread, while more are reserved).  ``size`` is
    what is written: a reader never reads past it, so it never sees half a line.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Locked under a name no replica claims, then renamed: a segment never exists
        # unlocked under its own name, where a live replica would take it for an orphan.
        fresh = path.with_name(path.name + ".new")
        self._handle = open(fresh, "ab")  # noqa: SIM115 - held open (and locked) for its life
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(fresh, path)
        self.size = self._handle.seek(0, os.SEEK_END)
        self.end = self.size
        self.broken = False
        self._dirty = False

    def reserve(self, line: str) -> int:
        """The offset ``line`` will be written at (lines are ASCII: encode() escapes)."""
        offset = self.end
        self.end += len(line) + 1
        return offset

    def append(self, lines: list[str], *, sync: bool) -> None:
        """Write reserved lines; with ``sync`` they are on disk when this returns."""
        data = "".join(line + "\n" for line in lines).encode("ascii")
        try:
            self._handle.write(data)
            self._handle.flush()
        except OSError:
            self.broken = True  # offsets reserved after these no longer hold
            raise
        self.size += len(data)
        self._dirty = True
        if sync:
            self.sync()

    def sync(self) -> None:
        if self._dirty:
            os.fsync(self._handle.fileno())
            self._dirty = False

    def truncate(self) -> None:
        """Empty the segment (every row in it is written; nothing is reserved)."""
        os.ftruncate(self._handle.fileno(), 0)
        self.size = self.end = 0
        self._dirty = False

    def read(self, offset: int, limit: int) -> Chunk:
        """Written rows from ``offset``, through a handle of its own: appends may be running."""
        with open(self.path, "rb") as handle:
            return read_chunk(handle, offset, limit, end=self.size)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
        self._handle.close()  # releases the lock


def claim_orphan(path: Path) -> Any | None:
    """``path`` opened and locked if no live process holds it, else None."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - returned open: the lock lives with it
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    if not path.exists():  # replayed and deleted by another replica between open and lock
        handle.close()
        return None
    return handle


def orphan_candidates(directory: Path, own: Collection[Path]) -> Iterator[Path]:
    """Segments (and quiet legacy spill files) in ``directory`` other than the ``own``
    ones, oldest first."""
    if not directory.is_dir():
        return
    quiet_since = time.time() - LEGACY_QUIET_S
    paths = [
        p
        for p in directory.iterdir()
        if p not in own
        and (
            p.suffix == SEGMENT_SUFFIX
            or (p.suffix == LEGACY_SUFFIX and p.name != DEAD_LETTERS and _mtime(p) < quiet_since)
        )
    ]
    yield from sorted(paths, key=lambda p: _mtime(p))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class DeadLetters:
    """Rows the database refused for good, with the reason: kept, never retried alone."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner

    def add(self, entry: Entry, error: BaseException) -> None:
        record = {
            "at": datetime.now(UTC).isoformat(),
            "owner": self.owner,
            "error": f"{type(error).__name__}: {error}",
            "entry": json.loads(encode(entry)),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write of one line with O_APPEND: replicas sharing the file never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(record, default=_json_default) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
