"""The decision writer: poison rows isolated, outages retried, crashes replayed, limits kept."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_store import make_decision
from tipgraph.decision_log import DecisionLog, DecisionLogFull, decision_log_problem
from tipgraph.settings import StoreSettings
from tipgraph.store import DecisionStore, StoreUnavailable, open_store
from tipgraph.store.records import DecisionRecord
from tipgraph.text import clean_text, unsafe_character
from tipgraph.wal import DEAD_LETTERS, Segment, encode

REPO = Path(__file__).resolve().parent.parent


def poisoned(event_id: str) -> DecisionRecord:
    """A decision no store accepts: a NaN feature would poison every model trained on it."""
    good = make_decision(event_id)
    bad = dataclasses.replace(good.candidates[0], features=[float("nan")] * 4)
    return dataclasses.replace(good, candidates=[bad, *good.candidates[1:]])


class Flaky:
    """A real store that is "down" (StoreUnavailable) while ``down`` is set."""

    def __init__(self, store: DecisionStore, *, down: bool = False) -> None:
        self.store = store
        self.down = down

    def write_batch(self, decisions: Any, shadows: Any, held: Any = ()) -> int:
        if self.down:
            raise StoreUnavailable("the database is down (test)")
        return self.store.write_batch(decisions, shadows, held)


def writer(store: Any, spill: Path | None, **kwargs: Any) -> DecisionLog:
    options: dict[str, Any] = {"flush_interval_s": 0.01, "batch_size": 16, "max_buffered": 8}
    return DecisionLog(store, spill_dir=spill, owner="ingress", **{**options, **kwargs})


def stored_ids(store: DecisionStore, ids: list[str]) -> set[str]:
    return {i for i in ids if store.get_decision(i) is not None}


async def test_a_poison_row_is_dead_lettered_and_blocks_no_other_row(
    store: DecisionStore, tmp_path: Path
) -> None:
    log = writer(store, tmp_path)
    ids = [f"e{i:03d}" for i in range(40)]
    for event_id in ids:
        await log.submit(poisoned(event_id) if event_id == "e017" else make_decision(event_id))
    assert await log.flush(timeout_s=30)
    assert stored_ids(store, ids) == set(ids) - {"e017"}
    assert log.dead_lettered == 1 and log.backlog == 0
    (letter,) = [json.loads(line) for line in (tmp_path / DEAD_LETTERS).read_text().splitlines()]
    assert letter["entry"]["row"]["event_id"] == "e017" and "finite" in letter["error"]
    assert decision_log_problem(log.health(), 60) is None  # dead-lettered is not stuck
    await log.close()


async def test_dead_letters_replay_once_their_cause_is_fixed(
    store: DecisionStore, tmp_path: Path
) -> None:
    log = writer(store, tmp_path)
    await log.submit(poisoned("sick"))
    await log.submit(make_decision("well"))
    assert await log.flush(timeout_s=30) and log.dead_lettered == 1
    # The operator fixes the row and hands the file back as a log to replay (k3s/README.md).
    letters = (tmp_path / DEAD_LETTERS).read_text().replace("NaN", "0.5")
    (tmp_path / DEAD_LETTERS).unlink()
    (tmp_path / "replay.wal").write_text(letters)
    assert await asyncio.to_thread(log.replay_orphans) == 1
    assert stored_ids(store, ["sick", "well"]) == {"sick", "well"}
    await log.close()


@pytest.mark.postgres
async def test_a_row_postgres_itself_refuses_is_isolated(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    with open_store(StoreSettings(url=postgres_url, pg_schema=pg_schema)) as store:
        log = writer(store, tmp_path)
        good = make_decision("fine")
        # A NUL in text (the store cleans texts that come from users and models, not a
        # version string): psycopg raises DataError, which must not look like an outage.
        bad = dataclasses.replace(make_decision("huge"), policy_version="v1\x00")
        await log.submit(good)
        await log.submit(bad)
        await log.submit(make_decision("after"))
        assert await log.flush(timeout_s=30)
        assert stored_ids(store, ["fine", "huge", "after"]) == {"fine", "after"}
        assert log.dead_lettered == 1
        assert "NUL" in (tmp_path / DEAD_LETTERS).read_text()
        await log.close()


async def test_an_outage_delays_rows_and_readiness_reports_their_age(
    store: DecisionStore, tmp_path: Path
) -> None:
    flaky = Flaky(store, down=True)
    log = writer(flaky, tmp_path)
    ids = [f"o{i}" for i in range(30)]
    for event_id in ids:
        await log.submit(make_decision(event_id))
    assert not await log.flush(timeout_s=0.3)  # bounded: never hangs on a dead database
    assert log.spilled == 30 - 8  # past max_buffered, rows wait on disk
    problem = decision_log_problem(log.health(), max_unwritten_age_s=0.2)
    assert problem is not None and "waited" in problem
    flaky.down = False
    assert await log.flush(timeout_s=30)
    assert stored_ids(store, ids) == set(ids) and log.dead_lettered == 0
    assert log.oldest_unwritten_s() == 0.0 and log.spilled == 0
    await log.close()
    assert not list(tmp_path.glob("*.wal"))


async def test_a_full_spill_refuses_new_rows_instead_of_losing_them(
    store: DecisionStore, tmp_path: Path
) -> None:
    flaky = Flaky(store, down=True)
    log = writer(flaky, tmp_path, max_buffered=1, max_spill_bytes=20_000)
    accepted: list[str] = []
    with pytest.raises(DecisionLogFull, match="unreachable for long"):
        for i in range(1000):
            await log.submit(make_decision(f"f{i}"))
            accepted.append(f"f{i}")
    assert 1 < len(accepted) < 1000
    problem = decision_log_problem(log.health(), 60)
    assert problem is not None and "full" in problem
    flaky.down = False
    assert await log.flush(timeout_s=30)
    assert stored_ids(store, accepted) == set(accepted)  # everything accepted was kept
    assert log.accepting
    await log.close()


def write_orphan(spill: Path, entries: list[DecisionRecord], torn: bool) -> Path:
    """A segment as a writer that died leaves it (its lock is gone with it)."""
    path = spill / "ingress-99999-deadbeef.wal"
    lines = "".join(encode(e) + "\n" for e in entries)
    path.write_text(lines + ('{"kind": "decision", "row": {"event_' if torn else ""))
    return path


async def test_a_segment_written_before_the_compact_log_replays(
    store: DecisionStore, tmp_path: Path
) -> None:
    """Decisions of release 8 carried the context vector; a segment it left behind during
    a rolling upgrade replays without it (every joint vector holds it)."""
    path = tmp_path / "ingress-99999-old.wal"
    lines = []
    for event_id in ("old1", "old2"):
        line = json.loads(encode(make_decision(event_id)))
        line["row"]["context_features"] = [1.0, 0.5]
        lines.append(json.dumps(line) + "\n")
    path.write_text("".join(lines))
    log = writer(store, tmp_path)
    assert await asyncio.to_thread(log.replay_orphans) == 2
    assert await log.flush(timeout_s=30)
    assert stored_ids(store, ["old1", "old2"]) == {"old1", "old2"}
    await log.close()


async def test_a_dead_writers_segment_is_replayed_once_torn_line_and_all(
    store: DecisionStore, tmp_path: Path
) -> None:
    ids = [f"r{i}" for i in range(25)]
    orphan = write_orphan(tmp_path, [make_decision(i) for i in ids], torn=True)
    held = Segment(tmp_path / "ingress-1-alive.wal")  # a live writer's: locked, left alone
    held.append([encode(make_decision("alive"))], sync=True)
    log = writer(store, tmp_path)
    await log.submit(make_decision("new"))
    assert await asyncio.to_thread(log.replay_orphans) == 25
    assert await asyncio.to_thread(log.replay_orphans) == 0  # claimed once, then gone
    assert await log.flush(timeout_s=30)
    assert stored_ids(store, [*ids, "new", "alive"]) == {*ids, "new"}
    assert log.replayed == 25 and log.torn_lines == 1 and not orphan.exists()
    assert held.path.exists()
    held.delete()
    await log.close()


async def test_durable_rows_are_on_disk_before_submit_returns(
    store: DecisionStore, tmp_path: Path
) -> None:
    flaky = Flaky(store, down=True)
    log = writer(flaky, tmp_path, durability="durable")
    ids = [f"d{i}" for i in range(12)]
    await asyncio.gather(*(log.submit(make_decision(i)) for i in ids))
    (segment,) = tmp_path.glob("ingress-*.wal")
    on_disk = {json.loads(line)["row"]["event_id"] for line in segment.read_text().splitlines()}
    assert on_disk == set(ids)  # all there, fsynced, although nothing reached the store
    flaky.down = False
    await log.close()
    assert stored_ids(store, ids) == set(ids) and not segment.exists()


CRASHING_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from tests.test_decision_log import Flaky
    from tests.test_store import make_decision
    from tipgraph.decision_log import DecisionLog
    from tipgraph.settings import StoreSettings
    from tipgraph.store import open_store

    async def main():
        # The database is cut: nothing reaches it before the kill.
        store = Flaky(open_store(StoreSettings(url=sys.argv[1])), down=True)
        log = DecisionLog(store, flush_interval_s=0.05, batch_size=16, max_buffered=1000,
                          spill_dir=Path(sys.argv[2]), owner="ingress", durability=sys.argv[3])
        i = 0
        while True:
            await log.submit(make_decision(f"k{i}"))
            print(f"k{i}", flush=True)  # the answer: only after submit returned
            i += 1
            await asyncio.sleep(0.002)

    asyncio.run(main())
    """
)


def crash_and_recover(store_url: str, spill: Path, durability: str) -> tuple[list[str], set[str]]:
    """Run a writer that answers decisions, SIGKILL it, replay: (answered, stored)."""
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WRITER, store_url, str(spill), durability],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdout is not None
    answered = []
    deadline = time.monotonic() + 60
    while len(answered) < 200 and time.monotonic() < deadline:
        answered.append(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    rest, _ = child.communicate()
    answered += [line for line in rest.splitlines() if line]
    assert len(answered) >= 200, "the writer did not start"
    with open_store(StoreSettings(url=store_url)) as store:
        log = DecisionLog(
            store,
            flush_interval_s=0.01,
            batch_size=64,
            max_buffered=100,
            spill_dir=spill,
            owner="ingress",
        )

        log.replay_orphans()  # what a replacement replica does first
        return answered, stored_ids(store, answered)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path}/crash.db"


def test_sigkill_loses_nothing_answered_when_durable(sqlite_url: str, tmp_path: Path) -> None:
    answered, stored = crash_and_recover(sqlite_url, tmp_path / "spill", "durable")
    assert set(answered) - stored == set()
    print(f"durable: {len(answered)} answered, 0 lost after SIGKILL")


def test_sigkill_loses_the_memory_window_when_buffered(sqlite_url: str, tmp_path: Path) -> None:
    answered, stored = crash_and_recover(sqlite_url, tmp_path / "spill", "buffered")
    lost = set(answered) - stored
    # Buffered keeps up to max_buffered (1000) rows in memory only: the documented window.
    assert 0 < len(lost) <= 1000
    print(f"buffered: {len(answered)} answered, {len(lost)} lost after SIGKILL (in memory)")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("nul\x00byte", "nulbyte"),
        ("rtl \u202eevil\u202c text", "rtl evil text"),
        ("lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("c1 \x85 and del \x7f", "c1  and del "),
        ("tab\tand\nnewline stay", "tab\tand\nnewline stay"),
    ],
)
def test_text_is_cleaned_of_controls_bidi_and_surrogates(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean
    assert (unsafe_character(raw) is None) == (raw == clean)
    clean.encode("utf-8")  # always encodable


async def test_llm_text_with_a_nul_is_stored_clean(store: DecisionStore, tmp_path: Path) -> None:
    from tipgraph.generation.parsing import parse_tips

    answer = json.dumps({"tips": [{"content": "Plan\u0000 your \u202eday", "kind": "focus"}]})
    (tip,) = parse_tips(answer, task_ids=(), max_chars=200).tips
    assert tip.content == "Plan your day"
    decision = make_decision("nul", content="Quote \x00 of a task")  # cleaned by the store too
    log = writer(store, tmp_path)
    await log.submit(decision)
    assert await log.flush(timeout_s=30) and log.dead_lettered == 0
    stored = store.get_decision("nul")
    assert stored is not None
    await log.close()


async def test_a_failing_disk_refuses_the_row_and_leaves_no_count_behind(
    store: DecisionStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No real disk fills up here: the write itself is made to fail, as ENOSPC would."""
    log = writer(store, tmp_path, durability="durable")
    await log.submit(make_decision("before"))

    def full(self: Segment, lines: list[str], *, sync: bool) -> None:
        self.broken = True
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Segment, "append", full)
    with pytest.raises(DecisionLogFull, match="No space left"):
        await log.submit(make_decision("refused"))
    monkeypatch.undo()
    await log.submit(make_decision("after"))  # a fresh segment takes over
    assert await log.flush(timeout_s=10)  # the refused row is not waited for
    assert log.backlog == 0 and stored_ids(store, ["before", "refused", "after"]) == {
        "before",
        "after",
    }
    await log.close()
