"""The CPU priority of a process that does background work beside the request path."""

from __future__ import annotations

import os
from pathlib import Path

TASKS = Path("/proc/self/task")
LOWEST = 19
"""The highest niceness, the lowest CPU priority."""


def lower_cpu_priority(increment: int) -> int:
    """Add ``increment`` to this process's niceness, up to :data:`LOWEST`, on every
    thread; return the niceness it now has.

    Like ``nice -n``, relative: Ray already starts its workers at niceness 15
    (``RAY_worker_niceness``), so a replica that should yield to the others has to go
    above theirs.  On Linux niceness belongs to each thread, not to the process
    (``setpriority(2)``), and a new thread inherits its creator's: a replica's threads
    already exist when its ``__init__`` runs, so each is lowered, and the threads they
    start later follow.  Only ever lowers the priority (raising it needs privileges).
    """
    target = min(LOWEST, os.getpriority(os.PRIO_PROCESS, 0) + max(increment, 0))
    thread_ids = [int(tid.name) for tid in TASKS.iterdir()] if TASKS.is_dir() else [0]
    for tid in thread_ids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < target:
                os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
    return os.getpriority(os.PRIO_PROCESS, 0)
