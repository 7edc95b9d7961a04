"""Small builders for request bodies (and token files) used across tests."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from tipgraph.auth import hash_token
from tipgraph.contracts import TipRequest
from tipgraph.decision_log import DecisionLog
from tipgraph.local import LocalStages
from tipgraph.metrics import Metrics
from tipgraph.service import TipService
from tipgraph.settings import TipgraphSettings
from tipgraph.store import DecisionStore
from tipgraph.wiring import decision_log

NOW = datetime(2026, 3, 4, 9, 30, tzinfo=UTC)  # a Wednesday morning


def task(task_id: str, content: str = "write report", **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "content": content, **extra}


def tip_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "user_id": "user-1",
        "now": NOW.isoformat(),
        "timezone": "UTC",
        "tasks": [
            task(
                "t1",
                "Finish the quarterly report for the board",
                priority=4,
                due=(NOW + timedelta(hours=3)).isoformat(),
            ),
            task("t2", "email", priority=1),
            task("t3", "gym", priority=1),
            task("t4", "water plants", priority=1),
            task(
                "t5",
                "Pay the electricity bill",
                priority=3,
                due=(NOW - timedelta(days=2)).isoformat(),
            ),
            task(
                "t6",
                "Prepare the slides for the offsite, collect feedback and rehearse twice",
                priority=2,
                created_at=(NOW - timedelta(days=20)).isoformat(),
            ),
        ],
    }
    body.update(overrides)
    return body


def local_service(
    settings: TipgraphSettings,
    store: DecisionStore,
    log: DecisionLog | None = None,
    *,
    metrics: Metrics | None = None,
) -> TipService:
    """The tip loop on in-process stages, wired as ``tipgraph.wiring`` does, on the test's
    own store (and writer, when given)."""
    log = log if log is not None else decision_log(store, settings.store, owner="test")
    metrics = metrics if metrics is not None else Metrics()
    stages = LocalStages(settings, store, log, metrics)
    return TipService(settings, stages, store, log, metrics=metrics)


async def served_event_ids(
    settings: TipgraphSettings, store: DecisionStore, users: int
) -> list[str]:
    """Decisions served in process and stored (the writer closed), one per user."""
    service = local_service(settings, store)
    ids = [
        (await service.tip(TipRequest.model_validate(tip_body(user_id=f"user-{i}")))).event_id
        for i in range(users)
    ]
    await service.log.close()
    return ids


def local_stages(settings: TipgraphSettings, store: DecisionStore) -> LocalStages:
    """In-process stages alone, e.g. a replica rebuilt from the log."""
    return LocalStages(
        settings, store, decision_log(store, settings.store, owner="test"), Metrics()
    )


def token_entry(token_id: str, token: str, *scopes: str, **extra: str) -> dict[str, object]:
    """One auth.tokens_file entry: the token's hash, never the token."""
    return {"id": token_id, "sha256": hash_token(token), "scopes": list(scopes), **extra}


def write_tokens(path: Path, *entries: dict[str, object]) -> None:
    """Replace the token file whole, as a Secret volume swaps its files: never half a file."""
    staged = path.with_suffix(".new")
    staged.write_text(yaml.safe_dump({"tokens": list(entries)}))
    os.replace(staged, path)
