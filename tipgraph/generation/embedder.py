"""The ``embedder`` alias: candidate tips as vectors, off the request path.

Embeddings are cached per user by the SHA-256 of the tip's text (the store never keeps
the text itself for this), so a refill that writes the same tip again costs no call.
They serve three ends: near-duplicate removal within a pool entry (cosine above
``embedder.duplicate_cosine``), a small candidate feature block, and a novelty feature
(:mod:`tipgraph.embedding_features`).  A dead or slow embedder costs the embeddings,
never a tip: callers get None and go on without.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from tipgraph.generation.breaker import CircuitBreaker
from tipgraph.generation.llm_config import load_llm_config
from tipgraph.generation.source import LLMUnavailable
from tipgraph.projection import PROJECTION, cosine
from tipgraph.settings import EmbedderSettings, GenerationSettings
from tipgraph.store import DecisionStore, StoreError
from tipgraph.text import text_hash


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    model: str


class EmbeddingClient(Protocol):
    def __call__(self, alias: str, texts: list[str], timeout_s: float) -> Awaitable[Embeddings]: ...


def embedding_model(settings: GenerationSettings) -> str | None:
    """What cached embeddings are keyed by: the model behind the ``embedder`` alias and the
    projection's version, so a new model or projection embeds again.  None when this
    configuration embeds nothing (task mode, inline LLM, embedder off)."""
    embedder = settings.embedder
    if not settings.pooled or not embedder.enabled:
        return None
    target = load_llm_config(settings.llm_config).target(embedder.model_alias)
    return f"{target or embedder.model_alias}|{PROJECTION.version}"


def near_duplicates(vectors: Sequence[Sequence[float]], threshold: float) -> set[int]:
    """Indices to drop so that no two kept vectors are closer than ``threshold``; the
    earlier of two near-duplicates stays (the model lists its best tips first)."""
    dropped: set[int] = set()
    for j in range(len(vectors)):
        if any(cosine(vectors[i], vectors[j]) > threshold for i in range(j) if i not in dropped):
            dropped.add(j)
    return dropped


class Embedder:
    def __init__(
        self,
        settings: EmbedderSettings,
        client: EmbeddingClient,
        breaker: CircuitBreaker,
        *,
        model_id: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.client = client
        self.breaker = breaker
        self.model_id = model_id
        """What the cache is keyed by (:func:`embedding_model`)."""
        self._clock = clock

    async def vectors(
        self, store: DecisionStore, user_key: str, texts: Sequence[str]
    ) -> list[list[float]] | None:
        """One vector per text, from the cache or one embedding call; None if the
        embedder failed (or its breaker is open)."""
        hashes = [text_hash(t) for t in texts]
        try:
            cached = await asyncio.to_thread(
                store.cached_embeddings, user_key, hashes, self.model_id
            )
        except StoreError:
            cached = {}
        missing = [i for i, h in enumerate(hashes) if h not in cached]
        if missing:
            fresh = await self._embed([texts[i] for i in missing])
            if fresh is None:
                return None
            new = {hashes[i]: vector for i, vector in zip(missing, fresh, strict=True)}
            cached.update(new)
            pairs = {h: (vector, PROJECTION(vector)) for h, vector in new.items()}
            # The cache is an optimisation: the vectors are good without it.
            with contextlib.suppress(StoreError, ValueError):
                await asyncio.to_thread(
                    store.cache_embeddings, user_key, pairs, self.model_id, self._clock()
                )
        return [cached[h] for h in hashes]

    async def _embed(self, texts: list[str]) -> list[list[float]] | None:
        if not texts:
            return []
        if not self.breaker.allow():
            return None
        timeout = self.settings.timeout_s
        try:
            result = await asyncio.wait_for(
                self.client(self.settings.model_alias, texts, timeout), timeout=timeout
            )
            vectors = [[float(x) for x in v] for v in result.vectors]
            if len(vectors) != len(texts) or not all(
                vectors[0] and len(v) == len(vectors[0]) and all(map(math.isfinite, v))
                for v in vectors
            ):
                raise LLMUnavailable(f"{len(vectors)} malformed embeddings for {len(texts)} texts")
        except (LLMUnavailable, TimeoutError, ValueError, TypeError):
            self.breaker.record_failure()
            return None
        self.breaker.record_success()
        return vectors


def cached_projections(
    store: DecisionStore, user_key: str, texts: Sequence[str], model_id: str
) -> list[tuple[float, ...] | None]:
    """Each text's cached projection under ``model_id``, None where there is none yet (or
    the store failed): the request path reads, never embeds.  Blocking: call it in a
    thread."""
    hashes = [text_hash(t) for t in texts]
    try:
        found = store.cached_projections(user_key, hashes, model_id)
    except StoreError:
        found = {}
    return [tuple(found[h]) if h in found else None for h in hashes]
