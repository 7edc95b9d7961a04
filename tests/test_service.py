"""The tip loop in one process (no Ray) against a real SQLite decision log."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from tests.factories import local_service, local_stages, tip_body
from tipgraph.contracts import FeedbackRequest, TipRequest
from tipgraph.decision_log import DecisionLog
from tipgraph.errors import FeedbackConflict, InvalidRequest, UnknownEvent
from tipgraph.event_ids import new_event_id
from tipgraph.features import FEATURE_SPEC
from tipgraph.local import LocalStages
from tipgraph.metrics import Metrics
from tipgraph.service import TipService
from tipgraph.settings import (
    EpsilonGreedySettings,
    StoreSettings,
    TipgraphSettings,
    UniformSettings,
)
from tipgraph.shadows import ShadowScorer, ShadowSet, per_shadow
from tipgraph.spill import SpillFailed
from tipgraph.store import DecisionStore, SQLiteStore, open_store
from tipgraph.wiring import decision_log

SHADOWS = [
    {"policy": {"name": "egreedy", "kind": "egreedy"}},
    {"policy": {"name": "broken", "kind": "uniform"}, "fault": {"fail": True}},
    {"policy": {"name": "slow", "kind": "uniform"}, "fault": {"delay_s": 0.5}},
]


@pytest.fixture
def settings(tmp_path: Path) -> TipgraphSettings:
    return TipgraphSettings(store={"url": f"sqlite:///{tmp_path}/log.db"}, shadows=SHADOWS)


@pytest.fixture
def store(settings: TipgraphSettings) -> Iterator[DecisionStore]:
    with open_store(settings.store) as opened:
        yield opened


def make_service(settings: TipgraphSettings, store: DecisionStore) -> TipService:
    log = decision_log(store, StoreSettings(flush_interval_s=0.01), owner="test")
    return local_service(settings, store, log)


def store_rows(store: DecisionStore, query: str, *params: object) -> list[tuple[object, ...]]:
    assert isinstance(store, SQLiteStore)
    with closing(sqlite3.connect(store.path)) as conn:
        return conn.execute(query, params).fetchall()


def request(**overrides: object) -> TipRequest:
    return TipRequest.model_validate(tip_body(**overrides))


async def test_tip_is_logged_with_every_candidate_and_every_policy(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service = make_service(settings, store)
    response = await service.tip(request())
    ids = [r.candidate_id for r in response.ranking]
    assert response.tip.candidate_id in ids
    assert sum(r.probability for r in response.ranking) == pytest.approx(1.0)
    assert response.probability == pytest.approx(
        next(r.probability for r in response.ranking if r.candidate_id == response.tip.candidate_id)
    )
    assert response.policy.name == "linucb"
    await service.close()  # waits for shadows, then flushes

    counts = store.counts()
    assert counts.decisions == 1
    assert counts.candidates == len(ids)
    assert counts.by_role == {"served": 1, "shadow": 3}
    assert counts.policy_runs == 4  # served + egreedy + slow + broken
    decision = store.get_decision(response.event_id)
    assert decision is not None
    assert decision.chosen_candidate_id == response.tip.candidate_id
    assert decision.user_key != "user-1"  # pseudonymised


async def test_a_failing_or_slow_shadow_does_not_delay_the_response(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service = make_service(settings, store)
    start = time.perf_counter()
    response = await service.tip(request())
    elapsed = time.perf_counter() - start
    assert elapsed < 0.4, "the 0.5 s shadow must not be awaited on the request path"
    assert response.latency_ms.total < 400
    await service.close()


async def test_every_shadow_logs_its_own_run_slow_or_broken(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    """In process as in a shadow replica (one ShadowScorer): a slow shadow's row is logged
    when it answers, a broken one's error stands in for its row; only failures count."""
    service = make_service(settings, store)
    response = await service.tip(request())
    await service.close()  # waits for the slow shadow's answer

    rows = store_rows(
        store,
        "SELECT policy_name, error, chosen_candidate_id, latency_ms FROM policy_runs "
        "WHERE event_id = ? AND role = 'shadow' ORDER BY policy_name",
        response.event_id,
    )
    by_name = {name: (error, chosen, latency) for name, error, chosen, latency in rows}
    assert sorted(by_name) == ["broken", "egreedy", "slow"]
    assert by_name["slow"][0] is None and by_name["slow"][1] is not None
    assert by_name["broken"][0].startswith("InjectedFault") and by_name["broken"][1] is None
    assert by_name["egreedy"][0] is None and by_name["egreedy"][1] is not None
    assert by_name["egreedy"][2] < 500 <= by_name["slow"][2]  # each shadow's own time
    assert service.shadow_failures == {"broken": 1}


async def test_feedback_teaches_served_and_shadow_policies_once(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service = make_service(settings, store)
    stages = service.stages
    assert isinstance(stages, LocalStages)
    response = await service.tip(request())
    before = stages.served.policy.stats_.b_.copy()

    first = await service.feedback(FeedbackRequest(event_id=response.event_id, reaction="done"))
    assert first.reward == 1.0
    await asyncio.sleep(0.05)  # shadow learning runs in the background
    assert stages.served.policy.n_updates == 1
    assert stages.shadows.scorers["egreedy"].service.policy.n_updates == 1
    assert (stages.served.policy.stats_.b_ != before).any()

    again = await service.feedback(FeedbackRequest(event_id=response.event_id, reaction="done"))
    assert again == first
    assert stages.served.policy.n_updates == 1
    assert store.counts().feedback == 1

    with pytest.raises(FeedbackConflict, match="already has feedback 'done'"):
        await service.feedback(FeedbackRequest(event_id=response.event_id, reaction="dismiss"))
    await service.close()


async def test_feedback_for_an_unknown_event_is_held_and_out_of_range_is_refused(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    impatient = settings.model_copy(
        update={"learning": settings.learning.model_copy(update={"reward_wait_s": 0.2})}
    )
    service = make_service(impatient, store)
    with pytest.raises(UnknownEvent, match="not one tipgraph issued"):
        await service.feedback(FeedbackRequest(event_id="nope", reaction="done"))
    forged = "0" * 40  # the signed form, with a MAC no key made
    with pytest.raises(UnknownEvent, match="not one tipgraph issued"):
        await service.feedback(FeedbackRequest(event_id=forged, reaction="done"))
    legacy = "0" * 32  # an id of the old, unsigned form: all of those are written by now
    with pytest.raises(UnknownEvent, match="not a known decision"):
        await service.feedback(FeedbackRequest(event_id=legacy, reaction="done"))
    # Signed but not readable: it may be a decision another replica has not written.
    unknown = new_event_id(settings.privacy.user_key_secret.get_secret_value())
    held = await service.feedback(FeedbackRequest(event_id=unknown, reaction="done"))
    assert held.status == "pending" and not held.learned and service.held_feedback == 1
    with pytest.raises(InvalidRequest, match=r"value: must be within \[0.0, 1.0\], got 3.0"):
        await service.feedback(FeedbackRequest(event_id=unknown, reaction="done", value=3.0))
    await service.log.flush()
    assert store.count_held_feedback() == 1  # shared, in the store
    # Feedback whose decision never appears expires after the reward wait.
    await asyncio.sleep(0.3)
    await service.feedback_path.apply_held()
    assert service.held_feedback == 0 and service.feedback_expired == 1
    await service.close()


async def test_feedback_held_before_its_decision_lands_is_applied_exactly_once(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    """Another replica's decision, not yet written when its feedback arrives here."""
    service = make_service(settings, store)
    other = local_service(
        settings, store, decision_log(store, StoreSettings(flush_interval_s=60), owner="test")
    )
    response = await other.tip(request())
    held = await service.feedback(FeedbackRequest(event_id=response.event_id, reaction="done"))
    assert held.status == "pending" and store.counts().feedback == 0
    await other.close()  # the other replica writes its decision
    deadline = time.monotonic() + 10
    while service.held_feedback and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert service.held_feedback == 0
    counts = store.counts()
    assert counts.feedback == 1 and counts.rewards == 1
    # Learned once, right away, by whichever replica applied it (any may: the table is shared).
    learners = [s.stages for s in (service, other)]
    assert all(isinstance(s, LocalStages) for s in learners)
    assert sum(s.served.policy.n_updates for s in learners if isinstance(s, LocalStages)) == 1
    again = await service.feedback(FeedbackRequest(event_id=response.event_id, reaction="done"))
    assert again.status == "applied" and store.counts().feedback == 1
    await service.close()


async def test_feedback_right_after_the_tip_finds_the_buffered_decision(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    slow_log = local_service(
        settings, store, decision_log(store, StoreSettings(flush_interval_s=60), owner="test")
    )
    response = await slow_log.tip(request())
    result = await slow_log.feedback(FeedbackRequest(event_id=response.event_id, reaction="snooze"))
    assert result.reward == 0.25
    await slow_log.close()


async def test_a_restarted_policy_rebuilds_from_the_log(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service = make_service(settings, store)
    for reaction in ("done", "dismiss", "snooze"):
        response = await service.tip(request())
        await service.feedback(FeedbackRequest(event_id=response.event_id, reaction=reaction))
    await service.close()
    live = service.stages
    assert isinstance(live, LocalStages)
    fresh = local_stages(settings, store)
    assert fresh.served.policy.n_updates == 3
    assert (fresh.served.policy.stats_.b_ == live.served.policy.stats_.b_).all()


async def test_all_tasks_excluded_is_a_clear_client_error(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service = make_service(settings, store)
    with pytest.raises(InvalidRequest, match="exclude_ids rules out every task"):
        await service.tip(request(exclude_ids=["t1", "t2", "t3", "t4", "t5", "t6"]))


async def test_learned_history_changes_the_next_context(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service = make_service(settings, store)
    response = await service.tip(request())
    await service.feedback(FeedbackRequest(event_id=response.event_id, reaction="done"))
    context = await service.stages.context(request(), service.user_key("user-1"))
    assert context.history_size == 1
    assert context.kind_stats[response.tip.kind].shown == 1
    await service.close()


async def test_feedback_after_the_reward_wait_is_stored_not_learned(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    impatient = settings.model_copy(
        update={"learning": settings.learning.model_copy(update={"reward_wait_s": 1e-6})}
    )
    service = make_service(impatient, store)
    response = await service.tip(request())
    answer = await service.feedback(FeedbackRequest(event_id=response.event_id, reaction="done"))
    assert answer.learned is False and answer.reward == 1.0
    stages = service.stages
    assert isinstance(stages, LocalStages)
    assert stages.served.policy.n_updates == 0
    assert store.counts().feedback == 1
    again = await service.feedback(FeedbackRequest(event_id=response.event_id, reaction="done"))
    assert again == answer
    await service.close()


async def test_silence_earns_the_default_reward_after_the_wait(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    quick = settings.model_copy(
        update={
            "learning": settings.learning.model_copy(
                update={"reward_wait_s": 0.05, "default_reward": 0.1}
            )
        }
    )
    service = make_service(quick, store)
    await service.tip(request())
    await service.log.flush()
    assert service.apply_default_rewards() == 0  # the wait has not run out yet
    await asyncio.sleep(0.1)
    assert service.apply_default_rewards() == 1
    assert service.apply_default_rewards() == 0  # once only
    stages = service.stages
    assert isinstance(stages, LocalStages)
    stages.sync()
    assert stages.served.policy.n_updates == 1
    assert stages.served.policy.stats_.b_.sum() > 0  # learned reward 0.1, not nothing
    await service.close()


async def test_default_reward_can_be_switched_off(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    off = settings.model_copy(
        update={
            "learning": settings.learning.model_copy(
                update={"reward_wait_s": 0.01, "default_reward": None}
            )
        }
    )
    service = make_service(off, store)
    await service.tip(request())
    await service.log.flush()
    await asyncio.sleep(0.05)
    assert service.apply_default_rewards() == 0
    await service.close()


async def test_the_writer_spills_past_its_bound_and_writes_everything_once(
    tmp_path: Path,
) -> None:
    """Rows beyond max_buffered go to the spill file, come back intact, and land once."""
    from tests.test_store import make_decision
    from tipgraph.wal import decode, encode

    with open_store(StoreSettings(url=f"sqlite:///{tmp_path}/log.db")) as store:
        spill = tmp_path / "spill"
        log = DecisionLog(
            store,
            flush_interval_s=60,
            batch_size=64,
            max_buffered=5,
            spill_dir=spill,
            owner="ingress",
        )
        records = [make_decision(f"e{i}", user_key=f"u{i % 3}") for i in range(23)]
        # Spilled rows are bit-for-bit the rows (floats like 5e-324 and 1e300 included).
        assert all(decode(encode(r)) == r for r in records)
        for record in records:
            await log.submit(record)
            await log.submit_policy_scores(record.event_id, [record.served], ["c0", "c1", "c2"])
        assert log.spilled == 2 * 23 - 5 and list(spill.glob("ingress-*.wal"))
        assert log.backlog == 2 * 23
        await log.close()
        assert log.spilled == 0 and log.backlog == 0 and not list(spill.glob("*.wal"))
        counts = store.counts()
        assert counts.decisions == 23 and counts.policy_runs == 23


async def test_erasing_a_user_removes_their_log_but_not_what_was_learned(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service = make_service(settings, store)
    for user in ("alice", "bob", "alice"):
        tip = await service.tip(request(user_id=user))
        await service.feedback(FeedbackRequest(event_id=tip.event_id, reaction="done"))
    buffered = await service.tip(request(user_id="alice"))  # still in the writer's buffer
    erased = await service.erase_user("alice")
    assert (erased.decisions_erased, erased.feedback_erased) == (3, 2)
    assert store.get_decision(buffered.event_id) is None
    counts = store.counts()
    assert (counts.decisions, counts.feedback, counts.rewards) == (1, 1, 3)
    assert store.user_history(service.user_key("alice"), 10) == []
    live = service.stages
    assert isinstance(live, LocalStages)
    rebuilt = local_stages(settings, store)  # a replica starting after the erasure
    assert rebuilt.served.policy.n_updates == live.served.policy.n_updates == 3
    assert (rebuilt.served.policy.stats_.b_ == live.served.policy.stats_.b_).all()
    await service.close()


async def test_shadow_overload_is_shed_and_counted_never_queued(
    settings: TipgraphSettings, store: DecisionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tipgraph.shadows as shadows_module

    monkeypatch.setattr(shadows_module, "MAX_SHADOW_INFLIGHT", 4)
    stuck = settings.model_copy(
        update={
            "shadows": [{"policy": {"name": "stuck", "kind": "egreedy"}, "fault": {"delay_s": 30}}]
        }
    )
    stuck = TipgraphSettings.model_validate(stuck.model_dump())
    service = local_service(stuck, store)
    reference = make_service(settings, store)
    started = time.perf_counter()
    for _ in range(12):
        answer = await service.tip(request(user_id="shed"))
    elapsed = time.perf_counter() - started
    assert elapsed < 5  # a 30 s shadow never delays the served answer
    assert service.shadows_shed == 12 - 4  # bounded: 4 in flight, the rest shed and counted
    expected = await reference.tip(request(user_id="shed"))
    assert [r.candidate_id for r in answer.ranking] == [r.candidate_id for r in expected.ranking]
    for task in list(service.shadows._answers):
        task.cancel()
    await reference.close()


async def test_feedback_is_held_when_the_store_fails_after_finding_the_decision(
    settings: TipgraphSettings, store: DecisionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tipgraph.store import StoreUnavailable

    service = make_service(settings, store)
    tip = await service.tip(request())
    await service.log.flush()
    real = store.record_feedback
    calls = 0

    def flaky(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("connection lost mid-write")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "record_feedback", flaky)
    held = await service.feedback(FeedbackRequest(event_id=tip.event_id, reaction="done"))
    assert held.status == "pending"
    await service.log.flush()  # the held feedback reaches the shared table
    assert await service.feedback_path.apply_held() == 1
    assert service.held_feedback == 0 and store.counts().feedback == 1 and calls == 2
    await service.close()


async def test_ten_thousand_forged_event_ids_are_refused_at_once_and_real_feedback_applies(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service = make_service(settings, store)
    tip = await service.tip(request())
    reads = 0
    real_get = store.get_decision

    def counted(event_id: str) -> object:
        nonlocal reads
        reads += 1
        return real_get(event_id)

    store.get_decision = counted  # type: ignore[method-assign]
    rng = random.Random(3)
    for _ in range(10_000):
        forged = "".join(rng.choice("0123456789abcdef") for _ in range(40))
        with pytest.raises(UnknownEvent, match="not one tipgraph issued"):
            await service.feedback(FeedbackRequest(event_id=forged, reaction="done"))
    assert reads == 0 and service.held_feedback == 0  # not one database read, nothing held
    answer = await service.feedback(FeedbackRequest(event_id=tip.event_id, reaction="done"))
    assert answer.status == "applied" and answer.learned
    await service.close()


async def test_erasure_races_a_second_replicas_buffered_rows_and_wins(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    """Replica B still holds the user's decisions (and its shadows' rows) when replica A
    erases the user: they are dropped when B writes them, and nothing of the user remains."""
    a = make_service(settings, store)
    slow = decision_log(store, StoreSettings(flush_interval_s=60), owner="b")
    b = local_service(settings, store, slow)
    kept = await a.tip(request(user_id="bob"))
    mine = [await b.tip(request(user_id="erase-me")) for _ in range(3)]
    written = await a.tip(request(user_id="erase-me"))
    await a.log.flush()
    assert b.log.backlog >= 3  # B's rows are not written yet
    erased = await a.erase_user("erase-me")
    assert erased.decisions_erased == 1
    await b.log.flush()  # B writes late: the tombstone drops them in the same transaction
    assert b.log.dropped_erased == 3
    for event_id in [written.event_id, *(m.event_id for m in mine)]:
        assert store.get_decision(event_id) is None and store.is_erased(event_id)
        late = FeedbackRequest(event_id=event_id, reaction="done")
        with pytest.raises(UnknownEvent, match="not a known decision"):
            await b.feedback(late)
    assert store.get_decision(kept.event_id) is not None
    await a.close()
    await b.close()
    key = a.user_key("erase-me")
    counts = store.counts()
    assert counts.decisions == 1  # bob's only
    assert store.user_history(key, 10) == []


async def test_held_feedback_outlives_the_replica_that_held_it(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    """Replica A holds feedback and goes away before the decision is written; replica B,
    started afterwards, applies it from the shared table."""
    writer = local_service(
        settings, store, decision_log(store, StoreSettings(flush_interval_s=60), owner="w")
    )
    tip = await writer.tip(request(user_id="late"))  # written only when `writer` closes
    a = make_service(settings, store)
    held = await a.feedback(FeedbackRequest(event_id=tip.event_id, reaction="done"))
    assert held.status == "pending"
    await a.close()  # A is gone; its held feedback is in the store, not in A
    assert store.count_held_feedback() == 1 and store.counts().feedback == 0
    await writer.close()  # now the decision is readable
    b = make_service(settings, store)
    await b.tip(request(user_id="someone"))  # any request starts B's applier
    deadline = time.monotonic() + 10
    while store.counts().feedback == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert store.counts().feedback == 1 and store.count_held_feedback() == 0
    await b.close()


async def test_a_rotated_user_key_still_erases_what_the_old_key_made(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    old = make_service(settings, store)
    before = await old.tip(request(user_id="rotating"))
    await old.close()
    rotated = settings.model_copy(
        update={
            "privacy": settings.privacy.model_copy(
                update={
                    "user_key_secret": SecretStr("a-new-secret"),
                    "user_key_id": "k2",
                    "retired_user_key_secrets": {"k1": settings.privacy.user_key_secret},
                }
            )
        }
    )
    new = make_service(rotated, store)
    after = await new.tip(request(user_id="rotating"))
    await new.log.flush()
    rows = store_rows(store, "SELECT event_id, user_key_id FROM decisions ORDER BY created_at")
    assert rows == [(before.event_id, "k1"), (after.event_id, "k2")]
    # Feedback on an id the retired key signed is still taken.
    answer = await new.feedback(FeedbackRequest(event_id=before.event_id, reaction="done"))
    assert answer.status == "applied"
    erased = await new.erase_user("rotating")
    assert (erased.decisions_erased, erased.feedback_erased) == (2, 1)
    assert store_rows(store, "SELECT COUNT(*) FROM decisions") == [(0,)]
    await new.close()


def test_a_retired_key_cannot_share_the_current_keys_id() -> None:
    with pytest.raises(ValueError, match="also a retired key's id"):
        TipgraphSettings(privacy={"user_key_id": "k1", "retired_user_key_secrets": {"k1": "old"}})


# -- every shadow in one place (tipgraph.shadows.ShadowSet), as the shadows replica runs them --


def shadow_set(settings: TipgraphSettings, store: DecisionStore) -> ShadowSet:
    log = decision_log(store, StoreSettings(flush_interval_s=0.01), owner="test")
    return ShadowSet.build(settings.shadows, store, log, Metrics())


def shadow_item(event_id: str, k: int = 3) -> tuple[np.ndarray, str, list[str], str]:
    X = np.random.default_rng(0).normal(size=(k, FEATURE_SPEC.dim))
    return (X, event_id, [f"c{i}" for i in range(k)], "c0")


class RefusingLog:
    """A decision log whose disk is full: every row it is given fails."""

    async def submit_policy_scores(self, *args: object) -> None:
        raise SpillFailed("cannot write the local decision log: disk full")


async def test_each_event_gets_every_shadows_error_in_one_call(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    shadows = shadow_set(settings, store)
    answers = await shadows.score_batch([shadow_item("e1"), shadow_item("e2", k=2)])
    assert [set(answer) for answer in answers] == [{"egreedy", "broken", "slow"}] * 2
    assert all(answer["egreedy"] is None for answer in answers)
    assert all("injected fault" in str(answer["broken"]) for answer in answers)


async def test_a_shadow_whose_rows_fail_costs_the_others_nothing(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    shadows = shadow_set(settings, store)
    healthy = shadows.scorers["egreedy"]
    failing = ShadowScorer(healthy.service, settings.shadows[0].fault, RefusingLog(), Metrics())  # type: ignore[arg-type]
    both = ShadowSet({"egreedy": healthy, "refused": failing})
    (answer,) = await both.score_batch([shadow_item("e1")])
    assert answer["egreedy"] is None
    assert answer["refused"] == "SpillFailed: cannot write the local decision log: disk full"


async def test_per_shadow_splits_one_answer_and_fails_each_on_a_failed_call() -> None:
    loop = asyncio.get_running_loop()
    ok: asyncio.Future[dict[str, str | None]] = loop.create_future()
    split = dict(per_shadow(ok, ["a", "b"]))
    ok.set_result({"a": None, "b": "boom"})
    assert [await split["a"], await split["b"]] == [None, "boom"]

    lost: asyncio.Future[dict[str, str | None]] = loop.create_future()
    failed = dict(per_shadow(lost, ["a", "b"]))
    lost.set_exception(ConnectionError("replica died"))
    for future in failed.values():
        with pytest.raises(ConnectionError):
            await future


def test_reconfigure_swaps_only_the_changed_policy_in_place(
    settings: TipgraphSettings, store: DecisionStore, caplog: pytest.LogCaptureFixture
) -> None:
    shadows = shadow_set(settings, store)
    egreedy, broken = shadows.scorers["egreedy"], shadows.scorers["broken"]
    x = np.ones(FEATURE_SPEC.dim)
    shadows.learn(1, x.tolist(), 1.0, 0.0)
    assert egreedy.service.policy.n_updates == broken.service.policy.n_updates == 1

    wider = EpsilonGreedySettings(name="egreedy", epsilon=0.3)
    same = broken.service.policy.settings
    with caplog.at_level(logging.WARNING):
        changed = shadows.reconfigure([wider, same, UniformSettings(name="new")], store)
    assert changed == ["egreedy"]
    assert shadows.scorers["egreedy"] is egreedy  # its fault and log stay
    assert egreedy.service.policy.settings == wider
    assert broken.service.policy.n_updates == 1  # untouched
    assert "shadow new is not running: redeploy to add it" in caplog.text
    assert shadows.names == ["egreedy", "broken", "slow"]
