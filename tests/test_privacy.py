"""Privacy and injection: what reaches the store and the logs."""

from __future__ import annotations

import ast
import logging
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest

from tests.factories import local_service, task, tip_body
from tipgraph.contracts import FeedbackRequest, TipRequest
from tipgraph.errors import UnknownEvent
from tipgraph.event_ids import new_event_id
from tipgraph.service import TipService
from tipgraph.settings import TipgraphSettings
from tipgraph.store import open_store
from tipgraph.store.packing import CandidateTexts, unpack_candidates

REPO = Path(__file__).resolve().parents[1]
USER_ID = "alice.private@example.com"
SECRET = "hmac-key-that-must-never-be-logged"
TOKEN = "api-token-that-must-never-be-logged"
TASK_TEXT = ["Call Dr. Nowak about the biopsy results", "Pay rent to Mr. Smith'; DROP TABLE x"]


def service_for(settings: TipgraphSettings) -> tuple[TipService, object]:
    store = open_store(settings.store)
    return local_service(settings, store), store


async def test_no_raw_user_id_task_text_or_secret_reaches_the_logs_or_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "log.db"
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{db}"},
        privacy={"user_key_secret": SECRET},
        auth={"api_token": TOKEN},
        shadows=[],
    )
    caplog.set_level(logging.DEBUG)
    service, store = service_for(settings)
    tasks = [task(f"task-{i}", content, priority=4 - i) for i, content in enumerate(TASK_TEXT)]
    event_ids = []
    for _ in range(6):
        tip = await service.tip(TipRequest(**tip_body(user_id=USER_ID, tasks=tasks)))
        event_ids.append(tip.event_id)
        await service.feedback(FeedbackRequest(event_id=tip.event_id, reaction="done"))
    # Error paths too: feedback held for a decision not written (yet), and a made-up id.
    unwritten = new_event_id(settings.privacy.user_key_secret.get_secret_value())
    await service.feedback(FeedbackRequest(event_id=unwritten, reaction="done"))
    with pytest.raises(UnknownEvent):
        await service.feedback(FeedbackRequest(event_id="f" * 40, reaction="done"))
    await service.close()
    store.close()  # type: ignore[attr-defined]

    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert len(caplog.records) >= 3, "the run must log something for this check to mean much"
    for needle in (USER_ID, SECRET, TOKEN, *TASK_TEXT, "task-0", "task-1"):
        assert needle not in logged

    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        logged = logged_candidates(conn)
        # The packed candidates are compressed: their texts go into the dump unpacked.
        dump = "\n".join(
            [repr(row) for table in tables for row in conn.execute(f'SELECT * FROM "{table}"')]
            + [repr(texts) for _, _, texts in logged]
        )
    shown = {t.content for _, chosen, texts in logged for t in texts if t.candidate_id == chosen}
    others = [t.content for _, chosen, texts in logged for t in texts if t.candidate_id != chosen]
    unshown = (len(others), sum(1 for content in others if content))
    for needle in (USER_ID, SECRET, TOKEN, "task-0", "task-1"):
        assert needle not in dump
    assert unshown[0] > 0 and unshown[1] == 0  # only the tip shown keeps its text
    without_shown = dump
    for text in shown:
        without_shown = without_shown.replace(repr(text)[1:-1], "")
    for text in TASK_TEXT:
        assert text not in without_shown  # task text only ever inside the tip shown


def logged_candidates(conn: sqlite3.Connection) -> list[tuple[str, str, list[CandidateTexts]]]:
    """(event id, chosen candidate id, every candidate's texts) of each logged decision;
    the shown tip's text is the decision row's, as the store reads it."""
    return [
        (
            event_id,
            chosen_id,
            [
                replace(t, content=chosen_content or "") if t.candidate_id == chosen_id else t
                for t in unpack_candidates(packed).texts
            ],
        )
        for event_id, chosen_id, packed, chosen_content in conn.execute(
            "SELECT event_id, chosen_candidate_id, candidates, chosen_content FROM decisions"
        )
    ]


@pytest.mark.parametrize("store_candidate_text", [False, True])
async def test_redacted_tip_texts_keep_no_task_quote_yet_the_user_sees_it(
    tmp_path: Path, store_candidate_text: bool
) -> None:
    db = tmp_path / "log.db"
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{db}"},
        privacy={
            "user_key_secret": SECRET,
            "store_tip_text": "redact",
            "store_candidate_text": store_candidate_text,
        },
        shadows=[],
    )
    service, store = service_for(settings)
    tasks = [task(f"task-{i}", content, priority=4 - i) for i, content in enumerate(TASK_TEXT)]
    quoting: dict[str, str] = {}  # event id -> a served text that quotes a task
    shown: list[str] = []
    served = 0
    while len(quoting) < 2 and served < 20:
        # Tips already shown are excluded, as the recommender does, until one quotes a task.
        body = tip_body(user_id=USER_ID, tasks=tasks, exclude_ids=shown)
        tip = await service.tip(TipRequest(**body))
        served += 1
        shown.append(tip.tip.candidate_id)
        if any(text in tip.tip.content for text in TASK_TEXT):
            quoting[tip.event_id] = tip.tip.content
    await service.close()
    store.close()  # type: ignore[attr-defined]

    assert len(quoting) == 2
    with sqlite3.connect(db) as conn:
        logged = logged_candidates(conn)
        # The packed candidates leave the shown tip's text to the decision row.
        packed_shown = [
            t.content
            for chosen_id, packed in conn.execute(
                "SELECT chosen_candidate_id, candidates FROM decisions"
            )
            for t in unpack_candidates(packed).texts
            if t.candidate_id == chosen_id
        ]
    assert packed_shown and set(packed_shown) == {None}
    chosen = {
        event_id: t.content
        for event_id, chosen_id, texts in logged
        for t in texts
        if t.candidate_id == chosen_id
    }
    stored = [t.content for _, _, texts in logged for t in texts if t.content]
    candidates = sum(len(texts) for _, _, texts in logged)
    for event_id, content in quoting.items():
        # The same tip: the quote replaced, the rest as served.
        redacted = chosen[event_id]
        assert "“[task]”" in redacted
        prefix = content.split("“")[0]
        assert redacted.startswith(prefix)
    assert candidates > served
    assert len(stored) == (candidates if store_candidate_text else served)
    for content in stored:
        for text in TASK_TEXT:
            assert text[:20] not in content


def test_every_sql_statement_is_a_constant_with_parameters() -> None:
    """No f-string or %-formatted SQL reaches execute(): values always travel as params."""
    offenders = []
    for path in sorted((REPO / "tipgraph" / "store").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "executemany", "executescript")
                and node.args
                and isinstance(node.args[0], ast.JoinedStr | ast.BinOp)
            ):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


async def test_hostile_strings_are_data_not_sql(tmp_path: Path) -> None:
    settings = TipgraphSettings(store={"url": f"sqlite:///{tmp_path}/log.db"}, shadows=[])
    service, store = service_for(settings)
    hostile = "x'); DROP TABLE decisions; --"
    tasks = [task(hostile, hostile), task("t2", "ordinary")]
    tip = await service.tip(TipRequest(**tip_body(user_id=hostile, tasks=tasks)))
    await service.feedback(FeedbackRequest(event_id=tip.event_id, reaction="done"))
    await service.close()
    counts = store.counts()  # type: ignore[attr-defined]
    assert counts.decisions == 1 and counts.feedback == 1
    store.close()  # type: ignore[attr-defined]
