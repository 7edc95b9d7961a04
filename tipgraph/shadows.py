"""Shadow policies in this process's event loop: started after the served answer, never
awaited by a request, bounded, and every answer (or failure) logged as a shadow run."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

from tipgraph.decision_log import DecisionLog
from tipgraph.errors import describe_error
from tipgraph.metrics import Metrics
from tipgraph.rows import failed_run, policy_run
from tipgraph.scoring import PolicyScore
from tipgraph.stages import Stages

logger = logging.getLogger(__name__)

MAX_SHADOW_INFLIGHT = 512
"""Requests with shadow work in flight beyond this shed theirs (skipped and counted), never
queued behind."""
SHADOW_TIMEOUT_S = 30.0
SHADOW_LOG_EVERY_S = 10.0
CLOSE_MARGIN_S = 1.0
"""How much longer than a shadow logger's own timeout ``close`` waits for it."""


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class ShadowRunner:
    """Starts every shadow on an event's candidates and logs their runs in the background;
    counts what it sheds and what fails."""

    def __init__(self, stages: Stages, log: DecisionLog, metrics: Metrics) -> None:
        self._stages = stages
        self._log = log
        self._metrics = metrics
        self._background: set[asyncio.Future[None]] = set()
        self._logged_at: dict[str, float] = {}
        self.shed = 0
        self.failures: dict[str, int] = {}

    def start(
        self, X: np.ndarray, event_id: str, candidate_ids: list[str], served_candidate_id: str
    ) -> None:
        if len(self._background) >= MAX_SHADOW_INFLIGHT:
            self.shed += 1
            logger.warning(
                "shadow scoring shed for event %s: %d in flight",
                event_id,
                len(self._background),
                extra={"event_id": event_id},
            )
            return
        # Every shadow starts now; one task per request (not per shadow) logs them all.
        pending = [
            (name, asyncio.ensure_future(call))
            for name, call in self._stages.shadow_scores(
                X, event_id, candidate_ids, served_candidate_id
            )
        ]
        if pending:
            self._spawn(self._log_runs(pending, event_id, candidate_ids, served_candidate_id))

    def learn(self, reward_id: int, features: list[float], reward: float) -> None:
        """Teach every shadow one reward, in the background."""
        for pending in self._stages.learn_shadows(reward_id, features, reward):
            self._spawn(_quietly(pending, "shadow learn"))

    def report_failure(self, name: str, error: str) -> None:
        """Count every failure; log one line per shadow per SHADOW_LOG_EVERY_S, so a broken
        shadow costs the serving event loop a counter increment, not a log write each time."""
        self.failures[name] = self.failures.get(name, 0) + 1
        self._metrics.shadow_failure(name)
        now = time.monotonic()
        if now - self._logged_at.get(name, float("-inf")) >= SHADOW_LOG_EVERY_S:
            self._logged_at[name] = now
            logger.warning(
                "shadow %s failing (%d failures so far): %s", name, self.failures[name], error
            )

    async def close(self) -> None:
        if self._background:
            # A shadow logger gives up on its shadows after SHADOW_TIMEOUT_S and then writes
            # their rows: waiting only as long raced it on a busy machine and lost the rows.
            await asyncio.wait(set(self._background), timeout=SHADOW_TIMEOUT_S + CLOSE_MARGIN_S)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _log_runs(
        self,
        pending: Sequence[tuple[str, asyncio.Future[PolicyScore]]],
        event_id: str,
        candidate_ids: list[str],
        served_candidate_id: str,
    ) -> None:
        start = time.perf_counter()
        finished_ms: dict[str, float] = {}

        def stamp(name: str) -> Callable[[object], None]:
            # Round trip as the ingress saw it, like the served policy's row.
            return lambda _: finished_ms.__setitem__(name, _ms(start))

        for name, future in pending:
            future.add_done_callback(stamp(name))
        await asyncio.wait([future for _, future in pending], timeout=SHADOW_TIMEOUT_S)
        runs = []
        for name, future in pending:
            latency_ms = finished_ms.get(name, _ms(start))
            if not future.done():
                future.cancel()
                error = f"TimeoutError: no answer within {SHADOW_TIMEOUT_S:g} s"
            elif future.cancelled():
                error = "CancelledError: the shadow call was cancelled"
            elif (err := future.exception()) is not None:
                error = describe_error(err)  # a shadow may fail in any way; only logged
            else:
                run = policy_run(future.result(), "shadow", candidate_ids, latency_ms)
                self._metrics.shadow_run(run, served_candidate_id)
                runs.append(run)
                continue
            self.report_failure(name, error)
            runs.append(failed_run(name, error, latency_ms))
        self._log.submit_policy_scores(event_id, runs, candidate_ids)


async def _quietly(pending: Awaitable[object], what: str) -> None:
    try:
        await asyncio.wait_for(pending, timeout=SHADOW_TIMEOUT_S)
    except Exception as err:
        logger.warning("%s failed: %s", what, err)
