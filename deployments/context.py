"""Context stage: tasks + the user's logged reactions + time -> features and prompt."""

from __future__ import annotations

import asyncio

from ray import serve

from tipgraph.batching import ItemFailure, run_each
from tipgraph.contracts import TipRequest
from tipgraph.features import UserContext, build_context, read_history
from tipgraph.logs import ReplicaLogs
from tipgraph.settings import TipgraphSettings
from tipgraph.store import open_store


@serve.deployment(name="context")
class ContextBuilder:
    def __init__(self, settings: TipgraphSettings) -> None:
        self._settings = settings
        self._logs = ReplicaLogs(settings.logs).start()
        self._store = open_store(settings.store)

    async def build_batch(
        self, items: list[tuple[TipRequest, str]]
    ) -> list[UserContext | ItemFailure]:
        """One context per (request, user_key); the store reads run in one worker thread."""
        return await asyncio.to_thread(run_each, self._build, items)

    def _build(self, item: tuple[TipRequest, str]) -> UserContext:
        request, user_key = item
        history = read_history(self._store, user_key, self._settings.features.history_limit)
        return build_context(request, history, self._settings.rewards)

    def __del__(self) -> None:
        self._store.close()
        self._logs.close()
