"""A background process's CPU priority (tipgraph.process), in a child process: niceness
only ever goes up, so the test process must not change its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import json, os, threading
    from tipgraph.process import lower_cpu_priority

    started, stop = threading.Event(), threading.Event()

    def wait():
        started.set()
        stop.wait()

    def priorities():
        found = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                found[int(tid)] = os.getpriority(os.PRIO_PROCESS, int(tid))
            except ProcessLookupError:  # a thread that just ended
                pass
        return found

    before = threading.Thread(target=wait, daemon=True)
    before.start()
    started.wait()
    try:
        result = lower_cpu_priority(NICE)
        later = {}

        def record():
            later["nice"] = os.getpriority(os.PRIO_PROCESS, 0)

        after = threading.Thread(target=record)
        after.start()
        after.join()
        threads = priorities()
    finally:
        stop.set()
    print(json.dumps({"result": result, "threads": threads, "later": later["nice"],
                      "again": lower_cpu_priority(4), "capped": lower_cpu_priority(30),
                      "never_raised": lower_cpu_priority(-5)}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_every_thread_of_the_process_runs_at_the_niceness_and_new_ones_follow() -> None:
    increment = 7
    out = subprocess.run(
        [sys.executable, "-c", CHILD.replace("NICE", str(increment))],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        # Like a Ray worker, the child starts above niceness 0: the increment is relative.
        preexec_fn=lambda: os.nice(2),
    )
    seen = json.loads(out.stdout)
    nice = os.getpriority(os.PRIO_PROCESS, 0) + 2 + increment
    assert seen["result"] == nice
    # The thread that existed before and the main thread, not only the caller's.
    assert len(seen["threads"]) >= 2 and set(seen["threads"].values()) == {nice}, seen
    assert seen["later"] == nice
    # Relative again, capped at the lowest priority, never raised.
    assert seen["again"] == min(nice + 4, 19)
    assert seen["capped"] == seen["never_raised"] == 19
