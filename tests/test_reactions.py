"""Reactions from the event bus (tipgraph.reactions): the protobuf contract, and the
consumer against the real NATS JetStream on 127.0.0.1:4222 with a real decision log.

The consumer runs on in-process stages here (tests/reaction_worker.py), and in a process
of its own where one is killed mid-stream; tests/test_e2e_bus.py runs it as the graph's
reactions deployment."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from tests.factories import local_service, served_event_ids
from tests.reaction_worker import reaction_consumer
from tests.tcp_proxy import TcpProxy
from tipgraph.autoscaling import LAG_METRIC, scale_on_lag
from tipgraph.contracts import FeedbackRequest
from tipgraph.errors import FeedbackConflict
from tipgraph.event_ids import new_event_id
from tipgraph.events.v1.events_pb2 import ReactionEvent
from tipgraph.local import LocalStages
from tipgraph.reactions import (
    DETAIL_HEADER,
    REASON_HEADER,
    Poison,
    ReactionConsumer,
    decode_reaction,
    encode_reaction,
    ensure_streams,
)
from tipgraph.serve_config import all_deployment_options
from tipgraph.settings import BUS_DEPLOYMENT, BusSettings, TipgraphSettings, load_settings
from tipgraph.store import DecisionStore, RowRejected, StoreError, open_store

ROOT = Path(__file__).resolve().parent.parent
REWARDS = {r: TipgraphSettings().rewards.reward_for(r) for r in ("done", "snooze", "dismiss")}


# -- the contract, without a server -------------------------------------------------------------


def test_a_reaction_round_trips_into_the_feedback_request_http_takes() -> None:
    at = datetime(2026, 3, 4, 9, 31, 5, tzinfo=UTC)
    data = encode_reaction("ev-1", "snooze", value=0.5, reacted_at=at)
    assert decode_reaction(data) == FeedbackRequest(
        event_id="ev-1", reaction="snooze", value=0.5, at=at
    )
    assert decode_reaction(encode_reaction("ev-2", "done")) == FeedbackRequest(
        event_id="ev-2", reaction="done"
    )


@pytest.mark.parametrize(
    ("data", "reason", "detail"),
    [
        (b"\xff\xff\xff\xff", "undecodable", "not a tipgraph.events.v1.ReactionEvent"),
        (ReactionEvent(event_id="ev-1").SerializeToString(), "invalid", "reaction: 0"),
        (ReactionEvent(reaction=1).SerializeToString(), "invalid", "event_id"),
        (
            ReactionEvent(event_id="ev\x00", reaction=1).SerializeToString(),
            "invalid",
            "event_id",
        ),
    ],
)
def test_messages_that_are_not_valid_reactions_are_poison(
    data: bytes, reason: str, detail: str
) -> None:
    with pytest.raises(Poison) as caught:
        decode_reaction(data)
    assert caught.value.reason == reason
    assert detail in caught.value.detail


def test_a_reaction_time_out_of_range_is_invalid_not_a_crash() -> None:
    event = ReactionEvent(event_id="ev-1", reaction=1)
    event.reacted_at.seconds = -62_000_000_000  # year 4 BC: refused as HTTP refuses it
    with pytest.raises(Poison) as caught:
        decode_reaction(event.SerializeToString())
    assert caught.value.reason == "invalid"


def test_the_generated_code_matches_the_proto_files(tmp_path: Path) -> None:
    subprocess.run(
        ["make", "-s", "proto", f"PROTO_OUT={tmp_path}"], cwd=ROOT, check=True, timeout=120
    )
    for name in ("events_pb2.py", "events_pb2.pyi"):
        generated = (tmp_path / "tipgraph" / "events" / "v1" / name).read_text()
        committed = (ROOT / "tipgraph" / "events" / "v1" / name).read_text()
        assert committed == generated, f"{name} drifted from proto/: run `make proto`"


def _lag_context(reports: dict[str, float], replicas: int, target: float) -> Any:
    return SimpleNamespace(
        current_num_replicas=replicas,
        target_num_replicas=replicas,
        aggregated_metrics={LAG_METRIC: reports} if reports else {},
        config=SimpleNamespace(get_target_ongoing_requests=lambda: target),
    )


def test_the_lag_policy_counts_the_shared_lag_once() -> None:
    # Both replicas read the same consumer: 1,500 waiting is 3 replicas' worth, not 6.
    desired, stats = scale_on_lag(_lag_context({"a": 1500.0, "b": 1500.0}, 2, 500.0))
    assert desired == 3.0
    assert stats == {"lag": 1500.0}
    assert scale_on_lag(_lag_context({"a": 0.0}, 2, 500.0))[0] == 0.0
    # Nothing reported yet: keep what runs.
    assert scale_on_lag(_lag_context({}, 2, 500.0))[0] == 2


def test_bus_settings_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="subject must differ"):
        BusSettings(subject="a.b", dead_letter_subject="a.b")
    with pytest.raises(ValueError, match="min_replicas must be >= 1"):
        BusSettings.model_validate({"deployment": {"autoscaling": {"min_replicas": 0}}})
    with pytest.raises(ValueError, match="'items'"):
        BusSettings.model_validate({"deployment": {"autoscaling": {"signal": "items"}}})
    with pytest.raises(ValueError, match="only the bus deployment"):
        deployments = TipgraphSettings().model_dump()["deployments"]
        deployments["context"]["autoscaling"]["signal"] = "lag"
        TipgraphSettings.model_validate({"deployments": deployments})


# -- against the real server ----------------------------------------------------------------


def _settings(tmp_path: Path, bus: BusSettings) -> TipgraphSettings:
    return TipgraphSettings.model_validate(
        {
            "store": {"url": f"sqlite:///{tmp_path}/log.db", "spill_dir": str(tmp_path / "spill")},
            "shadows": [],
            "bus": bus.model_dump(),
        }
    )


@pytest.fixture
async def js(bus_settings: BusSettings) -> AsyncIterator[JetStreamContext]:
    """The app's side of the bus, with the streams the consumer would create."""
    nc = await nats.connect(bus_settings.url)
    context = nc.jetstream()
    await ensure_streams(context, bus_settings)
    yield context
    await nc.close()


async def _until(check: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = check()
        if done if isinstance(done, bool) else await done:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def _rewards(settings: TipgraphSettings, ids: list[str]) -> dict[str, list[float]]:
    """Every reward row of these events (a list each: more than one is a double-apply)."""
    rows: dict[str, list[float]] = {}
    wanted = set(ids)
    for event_id, reward in _query(settings, "SELECT event_id, reward FROM rewards"):
        if event_id in wanted:
            rows.setdefault(event_id, []).append(reward)
    return rows


def _query(settings: TipgraphSettings, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(settings.store.url.removeprefix("sqlite:///")) as conn:
        return conn.execute(sql).fetchall()


async def _dead_letters(js: JetStreamContext, bus: BusSettings) -> list[tuple[str, str]]:
    """(reason, detail) of every dead letter, in order."""
    info = await js.stream_info(bus.dead_letter_stream)
    letters = []
    for seq in range(1, info.state.messages + 1):
        msg = await js.get_msg(bus.dead_letter_stream, seq)
        headers = msg.headers or {}
        letters.append((headers[REASON_HEADER], headers[DETAIL_HEADER]))
    return letters


async def _started(consumer: ReactionConsumer) -> ReactionConsumer:
    await consumer.connect()
    consumer.start()
    return consumer


async def _consume_all(
    settings: TipgraphSettings, store: DecisionStore, timeout_s: float = 30
) -> tuple[ReactionConsumer, LocalStages]:
    """A replica started now, run until the consumer's lag is zero, then closed."""
    consumer, stages = reaction_consumer(settings, store)
    await _started(consumer)
    try:
        await _until(lambda: _lag_is_zero(consumer), timeout_s, "the lag returned to zero")
    finally:
        await consumer.close()
    return consumer, stages


async def test_a_thousand_reactions_with_duplicates_and_a_killed_replica_apply_exactly_once(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    settings = _settings(tmp_path, bus_settings)
    store = open_store(settings.store)
    ids = await served_event_ids(settings, store, 900)
    rng = random.Random(23)
    reaction_of = {event_id: rng.choice(list(REWARDS)) for event_id in ids}
    messages = ids + rng.sample(ids, 100)  # 100 duplicates, published again later
    rng.shuffle(messages)

    # Replica B in a process of its own, killed mid-stream; replica A here.
    consumer: ReactionConsumer | None = None
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.reaction_worker", settings.model_dump_json()],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == b"ready"
        for event_id in messages:
            await js.publish(bus_settings.subject, encode_reaction(event_id, reaction_of[event_id]))
        await _until(lambda: len(_rewards(settings, ids)) >= 100, 30, "replica B applied some")
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        killed_after = len(_rewards(settings, ids))
        consumer, stages = reaction_consumer(settings, store)
        await _started(consumer)

        async def drained() -> bool:
            return await consumer.read_lag() == 0

        await _until(drained, 60, "the lag returned to zero")
    finally:
        if worker.poll() is None:
            worker.kill()
        if consumer is not None:
            await consumer.close()

    assert consumer is not None
    rewards = _rewards(settings, ids)
    assert killed_after < 900, "replica B finished before it was killed: nothing was tested"
    assert sorted(rewards) == sorted(ids)
    assert all(rewards[e] == [REWARDS[reaction_of[e]]] for e in ids), "applied twice"
    stored = dict(_query(settings, "SELECT event_id, reaction FROM feedback"))
    assert {e: stored[e] for e in ids} == reaction_of
    # Replica A applied what B had not stored (B's unacked messages came again after
    # ack_wait; what B stored and never acked is a duplicate to A).  A's policy started
    # from the rewards log (B's) and learned the rest: every reward exactly once.
    counts = consumer.counts
    assert counts.applied == 900 - killed_after
    assert stages.served.policy.n_updates == 900
    assert sum(counts.dead_lettered.values()) == 0
    store.close()


async def test_reactions_published_while_tipgraph_is_down_are_applied_when_it_starts(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    settings = _settings(tmp_path, bus_settings)
    store = open_store(settings.store)
    ids = await served_event_ids(settings, store, 300)
    # The consumer exists (it was running before), and no replica runs now.
    consumer, _ = reaction_consumer(settings, store)
    await consumer.connect()
    await consumer.close()
    for event_id in ids:
        await js.publish(bus_settings.subject, encode_reaction(event_id, "done"))
    info = await js.consumer_info(bus_settings.stream, bus_settings.durable)
    assert info.num_pending == 300

    consumer, stages = await _consume_all(settings, store, timeout_s=60)
    assert consumer.counts.applied == 300
    assert stages.served.policy.n_updates == 300
    assert _rewards(settings, ids) == {e: [REWARDS["done"]] for e in ids}
    store.close()


async def _lag_is_zero(consumer: ReactionConsumer) -> bool:
    return await consumer.read_lag() == 0


async def test_poison_goes_to_the_dead_letter_subject_with_its_reason_and_the_rest_applies(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    settings = _settings(tmp_path, bus_settings)
    store = open_store(settings.store)
    good, conflicted = await served_event_ids(settings, store, 2)
    # HTTP got there first for `conflicted`, with another reaction: feedback is final.
    http = local_service(settings, store)
    await http.feedback(FeedbackRequest(event_id=conflicted, reaction="done"))
    never_stored = new_event_id(settings.privacy.current_secret())  # issued, never logged
    published = [
        b"\x08\x96\x01\xff",  # not a ReactionEvent
        ReactionEvent(event_id=good).SerializeToString(),  # no reaction
        encode_reaction(good, "done", value=7.0),  # outside [min_reward, max_reward]
        encode_reaction("ev-from-elsewhere", "done"),  # not an id tipgraph issued
        encode_reaction(conflicted, "dismiss"),  # 409 over HTTP
        encode_reaction(never_stored, "done"),  # dead-lettered after decision_wait_s
        encode_reaction(good, "snooze"),  # and the consumer goes on
    ]
    for data in published:
        await js.publish(bus_settings.subject, data)
    consumer, _ = await _consume_all(settings, store)
    letters = await _dead_letters(js, bus_settings)
    reasons = sorted(reason for reason, _ in letters)
    assert reasons == sorted(
        ["undecodable", "invalid", "invalid", "unknown_event", "conflict", "unknown_event"]
    )
    details = dict(letters[i] for i in range(len(letters)))
    assert "feedback is final" in details["conflict"]
    waited = [d for r, d in letters if r == "unknown_event" and "decision_wait_s" in d]
    assert len(waited) == 1, letters
    assert consumer.counts.applied == 1
    assert consumer.counts.retried > 0  # the never-stored decision was retried, then dropped
    assert _rewards(settings, [good, conflicted]) == {
        good: [REWARDS["snooze"]],
        conflicted: [REWARDS["done"]],
    }
    store.close()


async def test_http_and_bus_feedback_for_one_event_apply_once_and_conflict_as_409(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    settings = _settings(tmp_path, bus_settings)
    store = open_store(settings.store)
    http_first, bus_first = await served_event_ids(settings, store, 2)
    http = local_service(settings, store)
    await http.feedback(FeedbackRequest(event_id=http_first, reaction="done"))
    await js.publish(bus_settings.subject, encode_reaction(http_first, "done"))
    await js.publish(bus_settings.subject, encode_reaction(bus_first, "snooze"))
    consumer, stages = await _consume_all(settings, store)
    assert (consumer.counts.applied, consumer.counts.duplicates) == (1, 1)
    # Rebuilt from the log (HTTP's reward), then taught the bus's: the duplicate taught nothing.
    assert stages.served.policy.n_updates == 2
    # Now HTTP after the bus: the same reaction is the stored answer, another is a 409.
    again = await http.feedback(FeedbackRequest(event_id=bus_first, reaction="snooze"))
    assert (again.status, again.reward) == ("applied", REWARDS["snooze"])
    with pytest.raises(FeedbackConflict):
        await http.feedback(FeedbackRequest(event_id=bus_first, reaction="done"))
    assert _rewards(settings, [http_first, bus_first]) == {
        http_first: [REWARDS["done"]],
        bus_first: [REWARDS["snooze"]],
    }
    store.close()


async def test_a_reaction_waits_in_the_stream_while_the_store_is_away(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    """An outage longer than decision_wait_s, then a moment when the store answers but
    the decision is not there yet (a writer still replaying it): neither dead-letters the
    reaction; the wait counts from the first "missing" answer, not from publishing."""
    settings = _settings(tmp_path, bus_settings)
    store = open_store(settings.store)
    (event_id,) = await served_event_ids(settings, store, 1)
    consumer, _ = reaction_consumer(settings, store)
    phase = {"now": "away", "missing_answers": 0}
    real_get = store.get_decision

    def get_decision(event: str) -> Any:
        if phase["now"] == "away":
            raise StoreError("the database is away")
        if phase["now"] == "missing":
            phase["missing_answers"] = int(phase["missing_answers"]) + 1
            return None
        return real_get(event)

    store.get_decision = get_decision  # type: ignore[method-assign]
    await js.publish(bus_settings.subject, encode_reaction(event_id, "done"))
    await _started(consumer)
    try:
        await asyncio.sleep(bus_settings.decision_wait_s + 1.0)
        assert consumer.counts.retried >= 2
        assert await consumer.read_lag() == 1
        phase["now"] = "missing"
        await _until(lambda: phase["missing_answers"] == 1, 30, "the store said missing")
        phase["now"] = "back"
        await _until(lambda: _lag_is_zero(consumer), 30, "applied once the decision is there")
    finally:
        await consumer.close()
    assert consumer.counts.applied == 1
    assert sum(consumer.counts.dead_lettered.values()) == 0
    assert _rewards(settings, [event_id]) == {event_id: [REWARDS["done"]]}
    store.close()


async def test_a_reaction_that_keeps_failing_unexpectedly_is_dead_lettered_as_failed(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    settings = _settings(tmp_path, bus_settings.model_copy(update={"max_failures": 3}))
    store = open_store(settings.store)
    broken, rejected = await served_event_ids(settings, store, 2)
    real_record = store.record_feedback

    def record_feedback(feedback: Any, **kwargs: Any) -> Any:
        if feedback.event_id == broken:
            raise RuntimeError("a bug")
        if feedback.event_id == rejected:
            raise RowRejected("value too long for the column")
        return real_record(feedback, **kwargs)

    store.record_feedback = record_feedback  # type: ignore[method-assign]
    for event_id in (broken, rejected):
        await js.publish(bus_settings.subject, encode_reaction(event_id, "done"))
    consumer, _ = await _consume_all(settings, store)
    letters = dict(await _dead_letters(js, bus_settings))
    assert letters["failed"] == "RuntimeError: a bug (failed 3 times)"
    assert letters["invalid"] == "value too long for the column"  # refused for good at once
    assert consumer.counts.retried == 2
    store.close()


async def test_a_server_back_without_its_streams_gets_them_made_again(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    settings = _settings(tmp_path, bus_settings)
    store = open_store(settings.store)
    first, second = await served_event_ids(settings, store, 2)
    await js.publish(bus_settings.subject, encode_reaction(first, "done"))
    consumer, _ = reaction_consumer(settings, store)
    await _started(consumer)
    try:
        await _until(lambda: consumer.counts.applied == 1, 30, "the first applied")
        await js.delete_stream(bus_settings.stream)  # as a server that lost its disk

        async def published_again() -> bool:
            try:  # refused until a replica has made the stream again
                await js.publish(bus_settings.subject, encode_reaction(second, "done"))
            except nats.js.errors.NoStreamResponseError:
                return False
            return True

        await _until(published_again, 30, "the stream made again")
        await _until(lambda: consumer.counts.applied == 2, 30, "the second applied")
    finally:
        await asyncio.wait_for(consumer.close(), 30)
    store.close()


def test_the_bus_overlay_adds_the_bus_deployment_scaled_on_lag() -> None:
    settings = load_settings(ROOT / "configs" / "tipgraph.yaml", [ROOT / "configs" / "bus.yaml"])
    assert settings.bus.reactions and settings.bus.decision_events.enabled
    options = all_deployment_options(settings)
    assert options[BUS_DEPLOYMENT]["autoscaling_config"]["policy"] == {
        "policy_function": "tipgraph.autoscaling:scale_on_lag"
    }
    # Off by default: `make run` has no bus deployment and needs no NATS.
    assert BUS_DEPLOYMENT not in all_deployment_options(
        load_settings(ROOT / "configs" / "tipgraph.yaml")
    )


async def test_a_replica_started_without_nats_connects_when_it_is_back_and_rides_a_cut(
    tmp_path: Path, bus_settings: BusSettings, js: JetStreamContext
) -> None:
    proxy = TcpProxy(("127.0.0.1", 4222))
    proxy.cut()
    bus = bus_settings.model_copy(update={"url": f"nats://127.0.0.1:{proxy.port}"})
    settings = _settings(tmp_path, bus)
    store = open_store(settings.store)
    ids = await served_event_ids(settings, store, 60)
    for event_id in ids[:30]:
        await js.publish(bus.subject, encode_reaction(event_id, "done"))
    consumer, _ = reaction_consumer(settings, store)
    consumer.start()  # as a replica does: it starts whether or not NATS answers
    try:
        await asyncio.sleep(1.5)
        assert not consumer.counts.connected and consumer.counts.applied == 0
        proxy.restore()
        await _until(lambda: consumer.counts.applied == 30, 30, "applied once NATS answered")
        proxy.cut()  # NATS away mid-stream: what is published meanwhile waits in the stream
        for event_id in ids[30:]:
            await js.publish(bus.subject, encode_reaction(event_id, "done"))
        await asyncio.sleep(1.0)
        proxy.restore()
        await _until(lambda: _lag_is_zero(consumer), 30, "the lag returned to zero")
    finally:
        await consumer.close()
        proxy.close()
    assert consumer.counts.applied == 60
    assert _rewards(settings, ids) == {e: [REWARDS["done"]] for e in ids}
    store.close()
