"""Shadow policies: they score the same candidates as the served policy and log their run,
never serving and never slowing a request.

Three pieces, the same whether the stages run in process or as Serve deployments:

* :class:`ShadowScorer` is one shadow: it scores a batch of events and logs each run (or
  failure) itself.  It is the only code that writes shadow rows.
* :class:`ShadowSet` is every shadow of the graph: it hands a batch to each shadow at once
  and answers each event's errors by shadow.  The ``shadows`` replica wraps one, and so
  does :class:`~tipgraph.local.LocalStages`: one call and one log writer for all the
  shadows, not a replica each (issue 21: each replica's per-call cost is about 1 ms of CPU).
* :class:`ShadowRunner` is the requester's side: it hands each served event to the stages'
  shadows after the answer is in, bounds the work in flight, and counts what is shed and
  what fails, in one place.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Mapping, Sequence

import numpy as np

from tipgraph.decision_log import DecisionLog
from tipgraph.errors import describe_error
from tipgraph.metrics import Metrics
from tipgraph.rows import failed_run, policy_run
from tipgraph.scoring import PolicyService, ShadowItem
from tipgraph.settings import FaultSettings, PolicySettings, ShadowSettings
from tipgraph.stages import Stages
from tipgraph.store import DecisionStore
from tipgraph.store.records import PolicyScoresRecord

logger = logging.getLogger(__name__)

MAX_SHADOW_INFLIGHT = 512
"""Requests with shadow work in flight beyond this shed theirs (skipped and counted), never
queued behind."""
SHADOW_TIMEOUT_S = 30.0
"""How long a shadow's learning may take; shutting down waits as long (plus a margin) for
the shadows' answers and learning still out."""
SHADOW_LOG_EVERY_S = 10.0
CLOSE_MARGIN_S = 1.0
"""How much longer than SHADOW_TIMEOUT_S ``close`` waits, so it does not race a learning task
that gives up at exactly that time."""


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class ShadowRunner:
    """Hands every served event to the shadows and counts what they shed and what fails,
    through callbacks on their answers: no task per request, and nothing a request waits
    for.  The shadows log their own runs (:class:`ShadowScorer`)."""

    def __init__(self, stages: Stages, metrics: Metrics) -> None:
        self._stages = stages
        self._metrics = metrics
        self._answers: set[asyncio.Future[str | None]] = set()
        self._learning: set[asyncio.Future[None]] = set()
        self._events_in_flight = 0
        self._logged_at: dict[str, float] = {}
        self.shed = 0
        self.failures: dict[str, int] = {}

    def start(
        self, X: np.ndarray, event_id: str, candidate_ids: list[str], served_candidate_id: str
    ) -> None:
        in_flight = self._events_in_flight + len(self._learning)
        if in_flight >= MAX_SHADOW_INFLIGHT:
            self.shed += 1
            logger.warning(
                "shadow scoring shed for event %s: %d in flight",
                event_id,
                in_flight,
                extra={"event_id": event_id},
            )
            return
        answers = [
            (name, asyncio.ensure_future(call))
            for name, call in self._stages.shadow_scores(
                X, event_id, candidate_ids, served_candidate_id
            )
        ]
        if not answers:
            return
        self._events_in_flight += 1
        outstanding = [len(answers)]
        for name, answer in answers:
            self._answers.add(answer)
            answer.add_done_callback(functools.partial(self._answered, name, outstanding))

    def learn(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> None:
        """Teach every shadow one reward, in the background."""
        for pending in self._stages.learn_shadows(reward_id, features, reward, rewarded_at):
            task = asyncio.ensure_future(_quietly(pending, "shadow learn"))
            self._learning.add(task)
            task.add_done_callback(self._learning.discard)

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
        """Wait for the shadows' answers in flight (each logs its row as it answers) and
        their learning, at most SHADOW_TIMEOUT_S + CLOSE_MARGIN_S."""
        pending = self._answers | self._learning
        if pending:
            await asyncio.wait(pending, timeout=SHADOW_TIMEOUT_S + CLOSE_MARGIN_S)

    def _answered(
        self, name: str, outstanding: list[int], answer: asyncio.Future[str | None]
    ) -> None:
        self._answers.discard(answer)
        outstanding[0] -= 1
        if outstanding[0] == 0:
            self._events_in_flight -= 1
        if answer.cancelled():
            self.report_failure(name, "CancelledError: the shadow call was cancelled")
        elif isinstance(err := answer.exception(), ShadowShed):
            self.shed += 1
        elif err is not None:
            # The call itself failed (a replica died, say): this shadow has no row.
            self.report_failure(name, describe_error(err))
        elif (error := answer.result()) is not None:
            self.report_failure(name, error)


class ShadowShed(RuntimeError):
    """A shadow that cannot keep up skipped the event: counted as shed, no row."""


class ShadowScorer:
    """One shadow policy: scores events (with its configured fault, for chaos tests) and logs
    every run, or the error that stood in for it, counting agreement with the served pick."""

    def __init__(
        self, service: PolicyService, fault: FaultSettings, log: DecisionLog, metrics: Metrics
    ) -> None:
        self.service = service
        self._fault = fault
        self._log = log
        self._metrics = metrics

    async def score_batch(self, items: Sequence[ShadowItem]) -> list[str | None]:
        """Score and log every event; returns each item's error (None when it scored)."""
        runs = await asyncio.gather(*(self._run(X, event_id, ids) for X, event_id, ids, _ in items))
        for (_, event_id, ids, served_id), run in zip(items, runs, strict=True):
            await self._log.submit_policy_scores(event_id, [run], ids)
            self._metrics.shadow_run(run, served_id)
        return [run.error for run in runs]

    async def _run(
        self, X: np.ndarray, event_id: str, candidate_ids: list[str]
    ) -> PolicyScoresRecord:
        start = time.perf_counter()
        try:
            result = await self.service.score_with_faults(X, event_id, self._fault)
        except Exception as err:  # a shadow may fail in any way; it is logged, never raised
            return failed_run(self.service.policy.name, describe_error(err), _ms(start))
        return policy_run(result, "shadow", candidate_ids, _ms(start))


ShadowErrors = dict[str, str | None]
"""One event's answer from :meth:`ShadowSet.score_batch`: each shadow's error, None when it
scored."""


class ShadowSet:
    """Every shadow policy of the graph: each batch goes to every shadow at once, and each
    shadow scores and logs it on its own, so a failing shadow costs the others nothing.  A
    slow one delays the batch's answer (the others' rows are written as they score), never
    a response."""

    def __init__(self, scorers: Mapping[str, ShadowScorer]) -> None:
        self.scorers = dict(scorers)
        # Fixed for the set's life: reconfigure swaps policies, never adds or drops one.
        self.names = list(self.scorers)

    @classmethod
    def build(
        cls,
        shadows: Sequence[ShadowSettings],
        store: DecisionStore,
        log: DecisionLog,
        metrics: Metrics,
    ) -> ShadowSet:
        """One scorer per shadow, each rebuilt from the rewards log, all writing to ``log``."""
        return cls(
            {
                shadow.policy.name: ShadowScorer(
                    PolicyService.rebuilt(shadow.policy, store), shadow.fault, log, metrics
                )
                for shadow in shadows
            }
        )

    async def score_batch(self, items: Sequence[ShadowItem]) -> list[ShadowErrors]:
        """Every shadow scores and logs every event; each event's errors by shadow."""
        answers = await asyncio.gather(
            *(scorer.score_batch(items) for scorer in self.scorers.values()),
            return_exceptions=True,
        )
        errors: list[ShadowErrors] = [{} for _ in items]
        for name, answer in zip(self.scorers, answers, strict=True):
            if isinstance(answer, BaseException):
                # Its runs may not be logged (the log refused them): each event counts it.
                reason = describe_error(answer)
                for event in errors:
                    event[name] = reason
                continue
            for event, error in zip(errors, answer, strict=True):
                event[name] = error
        return errors

    def learn(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float | None
    ) -> None:
        for scorer in self.scorers.values():
            scorer.service.learn(reward_id, features, reward, rewarded_at)

    def sync(self, store: DecisionStore) -> int:
        """Apply the rewards logged since each shadow's watermark; returns how many in all."""
        return sum(scorer.service.sync(store) for scorer in self.scorers.values())

    def snapshot(self, name: str) -> dict[str, object]:
        return self.scorers[name].service.snapshot()

    def reconfigure(self, policies: Sequence[PolicySettings], store: DecisionStore) -> list[str]:
        """Replace each shadow whose policy changed, rebuilt from the rewards log, in place;
        returns their names.  A shadow added or removed changes the graph, which needs a
        new deployment: it is logged and left as it is."""
        changed = []
        for policy in policies:
            scorer = self.scorers.get(policy.name)
            if scorer is None:
                logger.warning("shadow %s is not running: redeploy to add it", policy.name)
                continue
            if scorer.service.policy.settings == policy:
                continue
            scorer.service.swap(PolicyService.for_features(policy), store)
            changed.append(policy.name)
        gone = set(self.scorers) - {policy.name for policy in policies}
        if gone:
            logger.warning("shadows %s still run: redeploy to remove them", sorted(gone))
        return changed


def per_shadow(
    answer: asyncio.Future[ShadowErrors], names: Sequence[str]
) -> list[tuple[str, asyncio.Future[str | None]]]:
    """Split one event's answer from the shadows into an error future per shadow, for
    :class:`ShadowRunner`: a failed call fails each shadow's future, a shed one sheds each."""
    loop = asyncio.get_running_loop()
    futures = {name: loop.create_future() for name in names}

    def settle(done: asyncio.Future[ShadowErrors]) -> None:
        for name, future in futures.items():
            if done.cancelled():
                future.cancel()
            elif (err := done.exception()) is not None:
                future.set_exception(err)
            else:
                future.set_result(
                    done.result().get(name, f"shadow {name} is not in the shadows deployment")
                )

    answer.add_done_callback(settle)
    return list(futures.items())


async def _quietly(pending: Awaitable[object], what: str) -> None:
    try:
        await asyncio.wait_for(pending, timeout=SHADOW_TIMEOUT_S)
    except Exception as err:
        logger.warning("%s failed: %s", what, err)
