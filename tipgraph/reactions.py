"""Reactions from the event bus: NATS JetStream in, the feedback path out.

A reaction published to ``bus.subject`` as a protobuf ``tipgraph.events.v1.ReactionEvent``
(``proto/``) is pulled through the durable consumer ``bus.durable``, which every replica
of the bus deployment shares (JetStream hands each message to one of them), and
applied by :meth:`tipgraph.feedback.FeedbackService.apply_now`: the validation, reward
mapping and idempotent storing of ``POST /v1/feedback``.  Then, and only then, it is acked.

What happens to a message:

* applied, or a duplicate of feedback already stored (the same reaction and reward): ack;
* its decision is not stored yet, or the store is away: ``nak`` with a delay (doubling per
  delivery, up to 30 s), so it stays in the stream (counted in the lag) and comes again.
  A decision the store still says is missing ``bus.decision_wait_s`` after this replica
  first saw it missing is dead-lettered as ``unknown_event``; while the store is away the
  clock does not start, so an outage dead-letters nothing;
* poison — ``undecodable`` (not a ReactionEvent), ``invalid`` (what POST /v1/feedback
  refuses with 422), ``unknown_event`` (an id tipgraph never issued, or erased: 404),
  ``conflict`` (the event has another reaction already: 409), ``failed`` (an error
  tipgraph did not expect, ``bus.max_failures`` times) — is published to
  ``bus.dead_letter_subject`` with the reason in the ``Tipgraph-Reason`` header, then
  terminated, and the consumer goes on;
* a replica that dies holding a message never acks it: JetStream delivers it again after
  ``bus.ack_wait_s``, to any replica, and storing it again is a duplicate.

A reaction is stamped with when it was published (its ``reacted_at``, unless it has one,
and when tipgraph received it): one that waited in the stream through an outage counts
as arriving when it was sent, for the reward wait as for the history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import nats
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from tipgraph.contracts import FeedbackRequest
from tipgraph.errors import FeedbackConflict, InvalidRequest, UnknownEvent, describe_error
from tipgraph.events.v1.events_pb2 import Reaction, ReactionEvent
from tipgraph.feedback import DecisionNotReadable, FeedbackService
from tipgraph.metrics import Metrics
from tipgraph.settings import BusSettings
from tipgraph.store import RowRejected

logger = logging.getLogger(__name__)

PoisonReason = Literal["undecodable", "invalid", "unknown_event", "conflict", "failed"]
POISON_REASONS: tuple[PoisonReason, ...] = (
    "undecodable",
    "invalid",
    "unknown_event",
    "conflict",
    "failed",
)
Outcome = Literal["applied", "duplicate", "dead_lettered", "retried"]
REASON_HEADER = "Tipgraph-Reason"
DETAIL_HEADER = "Tipgraph-Detail"
SOURCE_HEADER = "Tipgraph-Source-Sequence"
"""The dead letter's sequence in the reactions stream, to find the original."""
MSG_ID_HEADER = "Nats-Msg-Id"
"""JetStream drops a second message with the same id within the stream's duplicate window."""
FETCH_WAIT_S = 1.0
"""How long one pull waits for messages: short, so a closing replica stops soon."""
RECONNECT_WAIT_S = 1.0
MAX_DETAIL_CHARS = 500
CLOSE_TIMEOUT_S = 5.0
MAX_RETRY_DELAY_S = 30.0
"""A retried reaction comes again after ``bus.retry_delay_s``, doubling per delivery up to
this: a long outage costs a delivery every 30 s per waiting reaction, not one a second."""
FAILURES_BEFORE_RECONNECT = 3
"""Pulls that fail in a row before the connection is made again from scratch (streams and
the durable consumer recreated where missing: NATS came back without its data)."""
TRACKED = 100_000
"""Reactions a replica remembers a wait or failures of (the oldest go first beyond it)."""
DUPLICATE_WINDOW_S = 120.0
"""A message published again with the same Nats-Msg-Id within this is dropped."""
DEAD_LETTER_DAYS = 30.0
"""How long the dead-letter stream keeps a letter: time to look, fix and republish."""

REACTIONS: dict[Reaction, str] = {
    Reaction.REACTION_DONE: "done",
    Reaction.REACTION_SNOOZE: "snooze",
    Reaction.REACTION_DISMISS: "dismiss",
}
REACTION_NUMBERS = {name: number for number, name in REACTIONS.items()}


class Poison(Exception):
    """A message that can never be applied, and why (the dead letter's reason)."""

    def __init__(self, reason: PoisonReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:MAX_DETAIL_CHARS]


def encode_reaction(
    event_id: str,
    reaction: str,
    *,
    value: float | None = None,
    reacted_at: datetime | None = None,
) -> bytes:
    """A ``ReactionEvent`` as the app's services publish it (tests, benchmarks, examples)."""
    event = ReactionEvent(event_id=event_id, reaction=REACTION_NUMBERS[reaction])
    if value is not None:
        event.value = value
    if reacted_at is not None:
        event.reacted_at.FromDatetime(reacted_at)
    return event.SerializeToString()


def decode_reaction(data: bytes) -> FeedbackRequest:
    """The message as the request ``POST /v1/feedback`` would take, validated by the same
    model; :class:`Poison` when it is not a ReactionEvent or not a valid one."""
    event = ReactionEvent()
    try:
        event.ParseFromString(data)
    except DecodeError as err:
        raise Poison("undecodable", f"not a tipgraph.events.v1.ReactionEvent: {err}") from err
    reaction = REACTIONS.get(event.reaction)
    if reaction is None:
        raise Poison("invalid", f"reaction: {event.reaction} is not done, snooze or dismiss")
    fields: dict[str, Any] = {"event_id": event.event_id, "reaction": reaction}
    if event.HasField("value"):
        fields["value"] = event.value
    try:
        if event.HasField("reacted_at"):
            fields["at"] = event.reacted_at.ToDatetime(tzinfo=UTC)
        return FeedbackRequest(**fields)
    except (ValidationError, ValueError, OverflowError) as err:
        raise Poison("invalid", _first_error(err)) from err


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "message"
        return f"{where}: {first.get('msg', '')}"
    return str(err)


@dataclass
class ReactionCounts:
    """What one replica did with the messages it pulled; ``lag`` is the durable consumer's
    (all replicas'): reactions published and not yet acked."""

    applied: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POISON_REASONS, 0))
    lag: int | None = None
    connected: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "lag": self.lag,
            "applied": self.applied,
            "duplicates": self.duplicates,
            "retried": self.retried,
            "dead_lettered": dict(self.dead_lettered),
        }


async def connect(url: str) -> NATS:
    """A connection to NATS that reconnects by itself, once the server answers (until then
    this retries: a replica starts whether or not NATS is up)."""
    while True:
        try:
            return await nats.connect(
                url,
                max_reconnect_attempts=-1,
                reconnect_time_wait=RECONNECT_WAIT_S,
                connect_timeout=2,
            )
        except Exception as err:
            # nats-py raises OSError or its own errors, depending on where it failed.
            logger.warning("NATS at %s not reachable (%s); retrying", url, err)
            await asyncio.sleep(RECONNECT_WAIT_S)


async def open_jetstream(bus: BusSettings, what: str) -> tuple[NATS, JetStreamContext]:
    """A connection and its JetStream context, the streams made where missing
    (``bus.create_streams``), retried until both work; ``what`` names the caller in logs."""
    while True:
        nc = await connect(bus.url)
        try:
            js = nc.jetstream()
            if bus.create_streams:
                await ensure_streams(js, bus)
            return nc, js
        except Exception as err:
            # JetStream not enabled, a stream that cannot be made: say so, keep trying.
            await close_quietly(nc)
            logger.warning("%s cannot start (%s); retrying", what, err)
            await asyncio.sleep(RECONNECT_WAIT_S)


async def close_quietly(nc: NATS | None) -> None:
    """Close, bounded: a close that waits on a dead server must not stop the replica."""
    if nc is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)


def stream_configs(bus: BusSettings) -> list[StreamConfig]:
    """The reactions stream and the dead-letter stream, and the decisions stream when
    decision events are on."""
    day_s = 86_400.0
    streams = [
        StreamConfig(
            name=bus.stream,
            subjects=[bus.subject],
            max_age=bus.max_age_days * day_s,
            duplicate_window=DUPLICATE_WINDOW_S,
            storage=StorageType.FILE,  # a reaction survives the server's restart
        ),
        StreamConfig(
            name=bus.dead_letter_stream,
            subjects=[bus.dead_letter_subject],
            max_age=DEAD_LETTER_DAYS * day_s,
            duplicate_window=DUPLICATE_WINDOW_S,
            storage=StorageType.FILE,
        ),
    ]
    events = bus.decision_events
    if events.enabled:
        streams.append(
            StreamConfig(
                name=events.stream,
                subjects=[events.subject],
                max_age=bus.max_age_days * day_s,
                duplicate_window=events.duplicate_window_s,
                storage=StorageType.FILE,
            )
        )
    return streams


async def ensure_streams(js: JetStreamContext, bus: BusSettings) -> list[str]:
    """Create the streams, and the durable consumer when reactions are consumed, where
    missing (existing ones stay as they are: ops may have tuned them); returns what was
    created."""
    created = []
    for config in stream_configs(bus):
        assert config.name is not None
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            created.append(f"stream {config.name}")
    try:
        await js.consumer_info(bus.stream, bus.durable)
    except NotFoundError:
        if bus.reactions:
            await js.add_consumer(bus.stream, consumer_config(bus))
            created.append(f"consumer {bus.durable} on {bus.stream}")
    for what in created:
        logger.info("created %s", what)
    return created


async def set_up_streams(bus: BusSettings) -> list[str]:
    """``tipgraph bus setup``: connect once and :func:`ensure_streams`."""
    nc = await nats.connect(bus.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        return await ensure_streams(nc.jetstream(), bus)
    finally:
        await nc.close()


def definitions(bus: BusSettings) -> dict[str, Any]:
    """The streams and the consumer as JetStream's API takes them (``nats stream add
    --config`` reads the same JSON)."""
    return {
        "streams": [config.as_dict() for config in stream_configs(bus)],
        "consumer": {"stream": bus.stream, "config": consumer_config(bus).as_dict()},
    }


def consumer_config(bus: BusSettings) -> ConsumerConfig:
    """The durable pull consumer every bus replica shares."""
    return ConsumerConfig(
        durable_name=bus.durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=bus.ack_wait_s,
        # Never given up on by JetStream: only this consumer decides a message is poison.
        max_deliver=-1,
        filter_subject=bus.subject,
        max_ack_pending=max(1000, bus.fetch_batch * 16),
    )


class ReactionConsumer:
    """One replica's pull loop on the shared durable consumer (no Ray: the reactions
    deployment runs it, and so do the tests)."""

    def __init__(
        self,
        bus: BusSettings,
        feedback: FeedbackService,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bus = bus
        self._feedback = feedback
        self._metrics = metrics
        self._clock = clock
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # By stream sequence: since when the store has said the decision is missing, and
        # how often applying failed unexpectedly.
        self._missing_since: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._consumer_lost = False
        self.counts = ReactionCounts()

    async def connect(self) -> None:
        """Connect (retrying until NATS answers and the streams are there), bind to the
        durable consumer."""
        nc, js = await open_jetstream(self._bus, "the reactions consumer")
        try:
            sub = await js.pull_subscribe_bind(self._bus.durable, stream=self._bus.stream)
        except Exception:
            await close_quietly(nc)
            raise
        self._nc, self._js, self._sub = nc, js, sub
        self.counts.connected = True

    def start(self) -> None:
        """Connect and consume in the background, and sample the lag (needs a loop)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._consume()), loop.create_task(self._sample_lag())]

    async def _start_consuming(self) -> None:
        while self._sub is None:
            try:
                await self.connect()
            except Exception as err:
                # No durable consumer to bind to, and bus.create_streams off: say so.
                logger.warning("the reactions consumer cannot bind (%s); retrying", err)
                await asyncio.sleep(RECONNECT_WAIT_S)

    async def _disconnect(self) -> None:
        nc, self._nc, self._js, self._sub = self._nc, None, None, None
        await close_quietly(nc)

    async def _consume(self) -> None:
        failures = 0
        while True:
            if self._sub is None:
                await self._start_consuming()
            assert self._sub is not None
            if self._consumer_lost:
                # A pull on a consumer that is gone just times out: the lag's read says so.
                logger.warning(
                    "the durable consumer %s is gone; making it again", self._bus.durable
                )
                self._consumer_lost = False
                self.counts.connected = False
                await self._disconnect()
                continue
            try:
                messages = await self._sub.fetch(self._bus.fetch_batch, timeout=FETCH_WAIT_S)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as err:
                # Disconnected, or the server restarting: nats-py reconnects by itself.  A
                # server that came back without its streams needs them made again.
                self.counts.connected = False
                failures += 1
                logger.warning("pulling reactions failed (%s); retrying", err)
                if failures >= FAILURES_BEFORE_RECONNECT:
                    await self._disconnect()
                await asyncio.sleep(RECONNECT_WAIT_S)
                continue
            failures = 0
            self.counts.connected = True
            await self.handle_batch(messages)

    async def handle_batch(self, messages: list[Msg]) -> list[Outcome]:
        """Apply a pulled batch, each message on its own (one's failure is not another's)."""
        return list(await asyncio.gather(*(self.handle(msg) for msg in messages)))

    async def handle(self, msg: Msg) -> Outcome:
        try:
            outcome = await self._apply(msg)
        except Exception as err:
            outcome = await self._unexpected(msg, err)
        self._count(outcome)
        return outcome

    async def _unexpected(self, msg: Msg, err: Exception) -> Outcome:
        """Not this message's fault as far as we know: it comes again after the delay, and
        is dead-lettered as ``failed`` once it has failed so ``bus.max_failures`` times."""
        sequence = _stream_sequence(msg)
        failures = self._failures[sequence] = self._failures.get(sequence, 0) + 1
        _forget_oldest(self._failures)
        if failures >= self._bus.max_failures:
            detail = f"{describe_error(err)} (failed {failures} times)"
            with contextlib.suppress(Exception):
                return await self._dead_letter(msg, Poison("failed", detail))
        logger.exception("reaction not applied; it will be delivered again")
        await _settle(msg.nak(delay=self._retry_delay(msg)))
        return "retried"

    def _settled(self, sequence: int) -> None:
        self._missing_since.pop(sequence, None)
        self._failures.pop(sequence, None)

    def _retry_delay(self, msg: Msg) -> float:
        doubled = self._bus.retry_delay_s * 2 ** min(_deliveries(msg) - 1, 16)
        return min(doubled, MAX_RETRY_DELAY_S)

    async def _apply(self, msg: Msg) -> Outcome:
        published_at = _published_at(msg)
        try:
            request = decode_reaction(msg.data)
            if request.at is None:
                request = request.model_copy(update={"at": published_at})
            applied = await self._feedback.apply_now(request, received_at=published_at)
        except Poison as poison:
            return await self._dead_letter(msg, poison)
        except InvalidRequest as err:
            return await self._dead_letter(msg, Poison("invalid", err.message))
        except RowRejected as err:  # the database refused the row itself: never better
            return await self._dead_letter(msg, Poison("invalid", str(err)))
        except UnknownEvent as err:
            return await self._dead_letter(msg, Poison("unknown_event", err.message))
        except FeedbackConflict as err:
            return await self._dead_letter(msg, Poison("conflict", err.message))
        except DecisionNotReadable as err:
            waited = self._missing_for(msg) if err.store_answered else 0.0
            if waited > self._bus.decision_wait_s:
                detail = f"{err}; missing for {waited:.0f} s (bus.decision_wait_s)"
                return await self._dead_letter(msg, Poison("unknown_event", detail))
            await msg.nak(delay=self._retry_delay(msg))
            return "retried"
        self._settled(_stream_sequence(msg))
        await msg.ack()
        return "applied" if applied.created else "duplicate"

    def _missing_for(self, msg: Msg) -> float:
        """How long the store has said this message's decision is missing, as this replica
        saw it (an outage does not count: the store said nothing then)."""
        now = self._clock()
        first = self._missing_since.setdefault(_stream_sequence(msg), now)
        _forget_oldest(self._missing_since)
        return now - first

    async def _dead_letter(self, msg: Msg, poison: Poison) -> Outcome:
        """Publish the message to the dead-letter subject (acknowledged by JetStream), then
        terminate it: a dead letter that could not be published is retried, not lost."""
        assert self._js is not None, "dead letters need the JetStream connection"
        sequence = _stream_sequence(msg)
        headers = {
            REASON_HEADER: poison.reason,
            DETAIL_HEADER: poison.detail.replace("\r", " ").replace("\n", " "),
            SOURCE_HEADER: str(sequence),
            # Redelivered before its term reached the server: dropped as the same letter.
            MSG_ID_HEADER: f"{self._bus.stream}-{sequence}",
        }
        await self._js.publish(self._bus.dead_letter_subject, msg.data, headers=headers)
        await msg.term()
        self._settled(sequence)
        logger.warning(
            "reaction dead-lettered (%s): %s",
            poison.reason,
            poison.detail,
            extra={"reason": poison.reason},
        )
        self.counts.dead_lettered[poison.reason] += 1
        self._metrics.bus_dead_letter(poison.reason)
        return "dead_lettered"

    def _count(self, outcome: Outcome) -> None:
        if outcome == "applied":
            self.counts.applied += 1
        elif outcome == "duplicate":
            self.counts.duplicates += 1
        elif outcome == "retried":
            self.counts.retried += 1
        self._metrics.bus_reaction(outcome)

    async def read_lag(self) -> int | None:
        """Reactions published and not yet acked (waiting, in flight or retried), as the
        durable consumer counts them; None when NATS cannot tell now."""
        if self._sub is None:
            return None
        try:
            info = await self._sub.consumer_info()
        except NotFoundError:
            self._consumer_lost = True  # NATS lost its data, or ops removed it
            return None
        except Exception as err:
            logger.warning("the consumer's lag cannot be read: %s", err)
            return None
        lag = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        self.counts.lag = lag
        self._metrics.sample_bus_lag(lag)
        return lag

    async def _sample_lag(self) -> None:
        while True:
            await asyncio.sleep(self._bus.lag_interval_s)
            await self.read_lag()

    async def close(self) -> None:
        """Stop pulling; a message being applied is finished or, if cut off, redelivered."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        # Not drain(): a message pulled and not acked is simply delivered again.
        await self._disconnect()
        self.counts.connected = False


def _published_at(msg: Msg) -> datetime:
    # JetStream's metadata carries when the message was stored in the stream.
    stamp: datetime = msg.metadata.timestamp
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)


def _forget_oldest(tracked: dict[int, Any]) -> None:
    if len(tracked) > TRACKED:
        tracked.pop(next(iter(tracked)))


def _deliveries(msg: Msg) -> int:
    return max(1, int(msg.metadata.num_delivered or 1))


def _stream_sequence(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


async def _settle(call: Any) -> None:
    with contextlib.suppress(Exception):
        await call
