"""The one place that talks to LiteLLM. Import it only where the LLM is really used:
``import litellm`` is slow and, without LITELLM_LOCAL_MODEL_COST_MAP, reaches the network."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tipgraph.generation.breaker import CircuitBreaker
from tipgraph.generation.embedder import (
    Embedder,
    EmbeddingClient,
    Embeddings,
    embedding_model,
)
from tipgraph.generation.judge import Judge
from tipgraph.generation.llm_config import LLMConfig, load_llm_config
from tipgraph.generation.pool import PooledGenerator, Refiller, RefillQueue, Refills
from tipgraph.generation.prompts import load_split, load_template
from tipgraph.generation.source import CandidateSource, Completion, LLMUnavailable, TipGenerator
from tipgraph.metrics import Metrics
from tipgraph.settings import GenerationSettings
from tipgraph.store import DecisionStore

logger = logging.getLogger(__name__)

LOCAL_PROVIDERS = {"ollama", "ollama_chat"}
WARM_UP_TIMEOUT_S = 10.0
"""A replica starts after this at the latest, warmed or not."""
MODES = {"ollama": "embedding"}  # ollama/... is used for the embedder alias


class LiteLLMCompleter:
    """Calls a model alias through LiteLLM's async Router (timeouts, retries, fallbacks)."""

    def __init__(self, config: LLMConfig) -> None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        import litellm  # heavy and network-minded: only processes that call an LLM load it

        # A Router asks an Ollama server about every model missing from LiteLLM's price
        # map (a blocking call to localhost:11434, whatever api_base says). Local models
        # cost nothing, so say so up front and start without touching the network.
        for entry in config.model_list:
            model = str(entry["litellm_params"]["model"])
            provider = model.split("/", 1)[0]
            if provider in LOCAL_PROVIDERS:
                litellm.model_cost.setdefault(
                    model,
                    {
                        "input_cost_per_token": 0.0,
                        "output_cost_per_token": 0.0,
                        "litellm_provider": provider,
                        "mode": MODES.get(provider, "chat"),
                    },
                )
        self.config = config
        self._router: Any = litellm.Router(**config.router_kwargs())

    async def __call__(
        self, alias: str, messages: list[dict[str, str]], timeout_s: float
    ) -> Completion:
        try:
            response = await self._router.acompletion(
                model=alias,
                messages=messages,
                timeout=timeout_s,
                response_format={"type": "json_object"},
            )
        except Exception as err:
            # LiteLLM's exceptions do not pickle: only a message may leave this process.
            raise LLMUnavailable(f"{type(err).__name__}: {str(err)[:300]}") from None
        text = response.choices[0].message.content or ""
        # response.model is the deployment that answered (after any fallback), e.g.
        # "ollama_chat/llama3.2:3b", not the alias.
        model = getattr(response, "model", None) or self.config.target(alias) or alias
        return Completion(text=text, model=str(model))

    async def embed(self, alias: str, texts: list[str], timeout_s: float) -> Embeddings:
        """:class:`~tipgraph.generation.embedder.EmbeddingClient` over the same Router."""
        try:
            response = await self._router.aembedding(model=alias, input=texts, timeout=timeout_s)
            vectors = [list(item["embedding"]) for item in response.data]
        except Exception as err:
            raise LLMUnavailable(f"{type(err).__name__}: {str(err)[:300]}") from None
        model = getattr(response, "model", None) or self.config.target(alias) or alias
        return Embeddings(vectors, str(model))

    async def warm_up(self, chat: Sequence[str] = (), embedding: Sequence[str] = ()) -> list[str]:
        """Call each alias once on a canned answer (LiteLLM's ``mock_response``: nothing
        leaves the process) and return those that failed; never raises.

        LiteLLM builds much of its request path (pydantic schemas, provider modules) on the
        first call: 0.6 s measured on an idle machine, more on a busy one, which the first
        request after a replica start would otherwise pay out of its ``timeout_s``.  Each
        chat alias's fallbacks are warmed too.  What a canned answer skips (the provider's
        request and the HTTP connection) is still paid on the first real call: 0.13 s here.
        """
        failed = []
        messages = [{"role": "user", "content": "warm-up"}]
        # A fallback is called exactly when its alias has just failed, within the same budget.
        chat = list(
            dict.fromkeys(a for alias in chat for a in (alias, *self.config.fallbacks(alias)))
        )
        for alias in chat:
            try:
                await self._router.acompletion(
                    model=alias,
                    messages=messages,
                    mock_response="{}",
                    response_format={"type": "json_object"},
                )
            except Exception as err:
                failed.append(alias)
                logger.warning("warm-up of %s failed: %s: %s", alias, type(err).__name__, err)
        for alias in embedding:
            try:
                await self._router.aembedding(model=alias, input=["warm-up"], mock_response=[0.0])
            except Exception as err:
                failed.append(alias)
                logger.warning("warm-up of %s failed: %s: %s", alias, type(err).__name__, err)
        return failed


def build_tip_generator(
    settings: GenerationSettings, *, completer: Any = None, metrics: Metrics | None = None
) -> TipGenerator:
    """The generator the configuration asks for; LiteLLM only when the LLM is used."""
    if settings.source == "tasks":
        return TipGenerator(settings, metrics=metrics)
    split = load_split(Path(settings.prompts_dir), settings.prompts)
    if completer is None:
        completer = LiteLLMCompleter(load_llm_config(settings.llm_config))
    return TipGenerator(
        settings, split=split, completer=completer, breaker=_breaker(settings), metrics=metrics
    )


def build_refill_queue(
    settings: GenerationSettings,
    store: DecisionStore,
    *,
    completer: Any = None,
    embed: EmbeddingClient | None = None,
    metrics: Metrics | None = None,
) -> tuple[RefillQueue, TipGenerator]:
    """The refill queue of the candidate pool, and the tip-generator its refills ask (its
    breaker and prompt split).

    ``completer`` and ``embed`` default to one LiteLLM Router for every alias; the queue's
    workers start on the running event loop at first use.
    """
    metrics = metrics if metrics is not None else Metrics()
    litellm_client: LiteLLMCompleter | None = None
    if completer is None or (embed is None and settings.embedder.enabled):
        litellm_client = LiteLLMCompleter(load_llm_config(settings.llm_config))
    completer = completer if completer is not None else litellm_client
    generator = build_tip_generator(settings, completer=completer, metrics=metrics)
    judge = None
    if settings.judge.enabled:
        judge = Judge(
            settings.judge,
            load_template(Path(settings.prompts_dir), settings.judge.prompt),
            completer,
            _breaker(settings),
            send_task_text=settings.send_task_text,
        )
    embedder = None
    if settings.embedder.enabled:
        embed_client: EmbeddingClient
        if embed is not None:
            embed_client = embed
        else:
            assert litellm_client is not None
            embed_client = litellm_client.embed
        model_id = embedding_model(settings)
        assert model_id is not None  # the pool, with the embedder on
        embedder = Embedder(settings.embedder, embed_client, _breaker(settings), model_id=model_id)
    refiller = Refiller(settings, generator, store, judge=judge, embedder=embedder, metrics=metrics)
    queue = RefillQueue(
        refiller.refill,
        size=settings.pool.queue_size,
        workers=settings.pool.workers,
        metrics=metrics,
    )
    return queue, generator


def build_candidate_source(
    settings: GenerationSettings,
    store: DecisionStore | None,
    *,
    refills: Refills | None = None,
    completer: Any = None,
    embed: EmbeddingClient | None = None,
    metrics: Metrics | None = None,
) -> tuple[CandidateSource, RefillQueue | None]:
    """What the generation stage serves from, and the refill queue it runs (pool only).

    Serving from the pool needs ``store``.  Given ``refills`` (the Serve graph sends them
    to the pool deployment), this process loads no LLM client; without, the refills run
    here, on a :func:`build_refill_queue` that is returned.
    """
    metrics = metrics if metrics is not None else Metrics()
    if not settings.pooled:
        return build_tip_generator(settings, completer=completer, metrics=metrics), None
    if store is None:
        raise ValueError("generation.serve_from: pool needs the store")
    if refills is not None:
        split, breaker, queue = load_split(Path(settings.prompts_dir), settings.prompts), None, None
    else:
        queue, generator = build_refill_queue(
            settings, store, completer=completer, embed=embed, metrics=metrics
        )
        assert generator.split is not None  # an LLM source always has its prompts
        split, breaker, refills = generator.split, generator.breaker, queue
    pooled = PooledGenerator(
        settings,
        split,
        store,
        refills,
        embedding_model=embedding_model(settings),
        metrics=metrics,
        breaker=breaker,
    )
    return pooled, queue


async def warm_up(completer: object, settings: GenerationSettings, *, refills: bool) -> list[str]:
    """Warm the aliases a process calls (:meth:`LiteLLMCompleter.warm_up`): inline
    generation calls the tip-generator; refills call it and the judge and embedder that are
    enabled.  Any other completer (tests, task tips) has nothing to warm."""
    if not isinstance(completer, LiteLLMCompleter):
        return []
    chat = [settings.model_alias]
    embedding = []
    if refills and settings.judge.enabled:
        chat.append(settings.judge.model_alias)
    if refills and settings.embedder.enabled:
        embedding.append(settings.embedder.model_alias)
    try:
        return await asyncio.wait_for(completer.warm_up(chat, embedding), WARM_UP_TIMEOUT_S)
    except TimeoutError:
        logger.warning("warm-up took over %.0f s and was left unfinished", WARM_UP_TIMEOUT_S)
        return chat + embedding


def _breaker(settings: GenerationSettings) -> CircuitBreaker:
    return CircuitBreaker(settings.breaker.failure_threshold, settings.breaker.reset_after_s)
