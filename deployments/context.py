"""Context stage: tasks + the user's logged reactions + time -> features and prompt."""

from __future__ import annotations

import asyncio

from ray import serve

from tipgraph.autoscaling import ItemLoad
from tipgraph.batching import ItemFailure, run_each
from tipgraph.contracts import TipRequest
from tipgraph.features import UserContext, read_user_context
from tipgraph.generation.embedder import embedding_model
from tipgraph.logs import ReplicaLogs
from tipgraph.settings import TipgraphSettings
from tipgraph.store import open_store


@serve.deployment(name="context")
class ContextBuilder:
    def __init__(self, settings: TipgraphSettings) -> None:
        self._settings = settings
        self._logs = ReplicaLogs(settings.logs).start()
        self._store = open_store(settings.store)
        self._embedding_model = embedding_model(settings.generation)
        self._load = ItemLoad()

    async def build_batch(
        self, items: list[tuple[TipRequest, str]]
    ) -> list[UserContext | ItemFailure]:
        """One context per (request, user_key); the store reads run in one worker thread."""
        with self._load.holding(len(items)):
            return await asyncio.to_thread(run_each, self._build, items)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What ``autoscaling.signal: items`` scales on (tipgraph.autoscaling)."""
        return self._load.report()

    def _build(self, item: tuple[TipRequest, str]) -> UserContext:
        request, user_key = item
        return read_user_context(
            self._store, request, user_key, self._settings, self._embedding_model
        )

    def __del__(self) -> None:
        self._store.close()
        self._logs.close()
