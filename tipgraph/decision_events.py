"""Decision events: each stored decision published to the bus, at least once.

With ``bus.decision_events.enabled`` the decision writers put each decision's event in the
outbox table in the decision's own transaction (:attr:`DecisionStore.decision_outbox`), so
no decision is stored without its event (a decision replayed from a dead writer's log may
put its event there again: at least once, again).  :class:`DecisionEventRelay`, in the bus
replicas, publishes the outbox's oldest events as ``tipgraph.events.v1.DecisionEvent`` and
deletes each once JetStream has acknowledged it.  A replica that dies between the two
publishes the event again later; the event id is the JetStream message id, so within the
stream's duplicate window readers see it once.  Several replicas may publish the same
event for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from tipgraph.errors import describe_error
from tipgraph.events.v1.events_pb2 import DecisionEvent
from tipgraph.metrics import Metrics
from tipgraph.reactions import (
    FAILURES_BEFORE_RECONNECT,
    MSG_ID_HEADER,
    close_quietly,
    open_jetstream,
)
from tipgraph.settings import BusSettings
from tipgraph.store import DecisionStore
from tipgraph.store.records import DecisionEventRow

logger = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 10.0
"""How long a look waits for JetStream's acks of what it published."""


class DecisionEventsNotAcked(RuntimeError):
    """JetStream acknowledged none of a look's events."""


def decision_event(row: DecisionEventRow) -> bytes:
    """The outbox row as the contract's ``DecisionEvent``."""
    event = DecisionEvent(
        event_id=row.event_id,
        policy_name=row.policy_name,
        policy_version=row.policy_version,
        prompt_version=row.prompt_version or "",
        candidate_id=row.candidate_id,
        probability=row.probability,
    )
    event.decided_at.FromDatetime(row.created_at)
    return event.SerializeToString()


class DecisionEventRelay:
    """Publishes the outbox, oldest first, and deletes what JetStream acknowledged."""

    def __init__(self, bus: BusSettings, store: DecisionStore, metrics: Metrics) -> None:
        self._bus = bus
        self._events = bus.decision_events
        self._store = store
        self._metrics = metrics
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._task: asyncio.Task[None] | None = None
        self.published = 0

    async def connect(self) -> None:
        """Connect, retrying until NATS answers and the streams are there."""
        self._nc, self._js = await open_jetstream(self._bus, "decision events")

    def start(self) -> None:
        """Connect and publish in the background (needs a running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        failures = 0
        while True:
            if self._js is None:
                await self.connect()
            try:
                published = await self.publish_pending()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as err:
                # The store or NATS away: the events wait in the outbox.  NATS back without
                # its streams: they are made again on the next connect.
                logger.warning("decision events not published now (%s); retrying", err)
                published, failures = 0, failures + 1
                if failures >= FAILURES_BEFORE_RECONNECT:
                    await self._disconnect()
            if published < self._events.batch:
                await asyncio.sleep(self._events.interval_s)

    async def publish_pending(self) -> int:
        """Publish up to ``batch`` events from the outbox; returns how many were acked
        (and deleted).  What was not acked within ``PUBLISH_TIMEOUT_S`` stays for the
        next look: publishing it again is harmless (the message id is the event id)."""
        assert self._js is not None, "connect first"
        rows = await asyncio.to_thread(self._store.pending_decision_events, self._events.batch)
        if not rows:
            return 0
        acks: list[asyncio.Future[Any]] = []
        try:
            for row in rows:
                acks.append(
                    await self._js.publish_async(
                        self._events.subject,
                        decision_event(row),
                        headers={MSG_ID_HEADER: row.event_id},
                    )
                )
            # An ack lost with its connection never comes: nats-py's futures have no timeout.
            outcomes: list[Any] = await asyncio.wait_for(
                asyncio.gather(*acks, return_exceptions=True), PUBLISH_TIMEOUT_S
            )
        finally:
            for ack in acks:
                ack.cancel()  # no-op on a done one
        done = [
            row.seq for row, outcome in zip(rows, outcomes, strict=True) if not _failed(outcome)
        ]
        if not done:
            # Nothing acked: NATS away, or its stream gone; the caller reconnects.
            raise DecisionEventsNotAcked(describe_error(next(o for o in outcomes if _failed(o))))
        if len(done) < len(rows):
            logger.warning(
                "%d of %d decision events not acknowledged; they stay in the outbox",
                len(rows) - len(done),
                len(rows),
            )
        await asyncio.to_thread(self._store.delete_decision_events, done)
        self.published += len(done)
        self._metrics.bus_decisions_published(len(done))
        return len(done)

    async def _disconnect(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        await close_quietly(nc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._disconnect()


def _failed(outcome: object) -> bool:
    return isinstance(outcome, BaseException)
