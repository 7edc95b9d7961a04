"""Run a function every few seconds in a daemon thread, until stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Periodic:
    """Calls ``fn`` every ``interval_s`` seconds; an exception is logged, never fatal.

    A thread rather than an asyncio task: the work is blocking store I/O, and a replica's
    constructor may run before its event loop does.
    """

    def __init__(
        self,
        interval_s: float,
        fn: Callable[[], object],
        name: str,
        *,
        first_after_s: float | None = None,
    ) -> None:
        self._interval_s = interval_s
        self._first_after_s = interval_s if first_after_s is None else first_after_s
        self._fn = fn
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        wait = self._first_after_s
        while not self._stop.wait(wait):
            wait = self._interval_s
            try:
                self._fn()
            except Exception:
                logger.exception(
                    "periodic task %s failed; retrying next interval", self._thread.name
                )
