"""Decision events (tipgraph.decision_events): the outbox published to the real NATS
JetStream, at least once, seen once within the duplicate window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.js import JetStreamContext

from tests.factories import served_event_ids
from tipgraph.decision_events import DecisionEventRelay, DecisionEventsNotAcked
from tipgraph.events.v1.events_pb2 import DecisionEvent
from tipgraph.metrics import Metrics
from tipgraph.reactions import MSG_ID_HEADER, ensure_streams
from tipgraph.settings import BusSettings, TipgraphSettings
from tipgraph.store import StoreUnavailable, open_store


@pytest.fixture
async def js(bus_settings: BusSettings) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(bus_settings.url)
    yield nc.jetstream()
    await nc.close()


def _settings(tmp_path: Path, bus: BusSettings) -> TipgraphSettings:
    events = {**bus.decision_events.model_dump(), "enabled": True, "batch": 7}
    return TipgraphSettings.model_validate(
        {
            "store": {"url": f"sqlite:///{tmp_path}/log.db", "spill_dir": str(tmp_path / "spill")},
            "shadows": [],
            "bus": {**bus.model_dump(), "reactions": False, "decision_events": events},
        }
    )


async def _published(js: JetStreamContext, bus: BusSettings) -> list[tuple[str, DecisionEvent]]:
    stream = bus.decision_events.stream
    info = await js.stream_info(stream)
    events = []
    for seq in range(1, info.state.messages + 1):
        msg = await js.get_msg(stream, seq)
        event = DecisionEvent()
        event.ParseFromString(msg.data)
        events.append(((msg.headers or {})[MSG_ID_HEADER], event))
    return events


async def test_every_stored_decision_is_published_once_even_when_a_delete_is_lost(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    settings = _settings(tmp_path, bus_settings)
    store = open_store(settings.store, decision_outbox=True)
    ids = await served_event_ids(settings, store, 10)
    relay = DecisionEventRelay(settings.bus, store, Metrics())
    await relay.connect()
    real_delete = store.delete_decision_events

    def crash(seqs: object) -> None:  # published, then the replica died before deleting
        raise StoreUnavailable("the database went away")

    store.delete_decision_events = crash  # type: ignore[method-assign,assignment]
    with pytest.raises(StoreUnavailable):
        await relay.publish_pending()
    store.delete_decision_events = real_delete  # type: ignore[method-assign]
    # Published again from the outbox (7 a look), and JetStream keeps each event once.
    assert [await relay.publish_pending() for _ in range(3)] == [7, 3, 0]
    await relay.close()
    assert store.pending_decision_events(100) == []
    published = await _published(js, bus_settings)
    assert [message_id for message_id, _ in published] == ids
    for (message_id, event), event_id in zip(published, ids, strict=True):
        stored = store.get_decision(event_id)
        assert stored is not None
        assert event.event_id == message_id == event_id
        assert (event.policy_name, event.policy_version) == (
            stored.policy_name,
            stored.policy_version,
        )
        assert (event.candidate_id, event.probability) == (
            stored.chosen_candidate_id,
            stored.chosen_probability,
        )
        assert event.decided_at.ToDatetime(tzinfo=stored.created_at.tzinfo) == stored.created_at
    # The contract carries no user id and no task text.
    assert {f.name for f in DecisionEvent.DESCRIPTOR.fields} == {
        "event_id",
        "policy_name",
        "policy_version",
        "prompt_version",
        "candidate_id",
        "probability",
        "decided_at",
    }
    assert relay.published == 10
    store.close()


async def test_the_relay_publishes_in_the_background_and_makes_no_reactions_consumer(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    settings = _settings(tmp_path, bus_settings)
    store = open_store(settings.store, decision_outbox=True)
    relay = DecisionEventRelay(settings.bus, store, Metrics())
    relay.start()
    ids = await served_event_ids(settings, store, 3)
    for _ in range(100):
        if relay.published == 3:
            break
        await asyncio.sleep(0.1)
    await relay.close()
    assert [message_id for message_id, _ in await _published(js, bus_settings)] == ids
    # Reactions are off: no durable consumer was made for them.
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.consumer_info(bus_settings.stream, bus_settings.durable)
    store.close()


async def test_without_decision_events_no_decisions_stream_is_made(
    bus_settings: BusSettings, js: JetStreamContext
) -> None:
    await ensure_streams(js, bus_settings)
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.stream_info(bus_settings.decision_events.stream)


async def test_the_relay_makes_a_lost_stream_again_and_publishes_what_waited(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    settings = _settings(tmp_path, bus_settings)
    store = open_store(settings.store, decision_outbox=True)
    relay = DecisionEventRelay(settings.bus, store, Metrics())
    await relay.connect()
    await js.delete_stream(bus_settings.decision_events.stream)  # NATS lost its disk
    ids = await served_event_ids(settings, store, 2)
    with pytest.raises(DecisionEventsNotAcked):
        await relay.publish_pending()
    assert len(store.pending_decision_events(10)) == 2  # kept for the next look
    relay.start()  # the loop reconnects after repeated failures, which makes the stream
    for _ in range(200):
        if relay.published == 2:
            break
        await asyncio.sleep(0.1)
    await relay.close()
    assert [message_id for message_id, _ in await _published(js, bus_settings)] == ids
    store.close()
