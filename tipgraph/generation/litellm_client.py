"""The one place that talks to LiteLLM. Import it only where the LLM is really used:
``import litellm`` is slow and, without LITELLM_LOCAL_MODEL_COST_MAP, reaches the network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tipgraph.generation.breaker import CircuitBreaker
from tipgraph.generation.llm_config import LLMConfig, load_llm_config
from tipgraph.generation.prompts import load_split
from tipgraph.generation.source import Completion, LLMUnavailable, TipGenerator
from tipgraph.metrics import Metrics
from tipgraph.settings import GenerationSettings

LOCAL_PROVIDERS = {"ollama", "ollama_chat"}
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


def build_tip_generator(
    settings: GenerationSettings, *, completer: Any = None, metrics: Metrics | None = None
) -> TipGenerator:
    """The generator the configuration asks for; LiteLLM only when the LLM is used."""
    if settings.source == "tasks":
        return TipGenerator(settings, metrics=metrics)
    split = load_split(Path(settings.prompts_dir), settings.prompts)
    if completer is None:
        completer = LiteLLMCompleter(load_llm_config(settings.llm_config))
    breaker = CircuitBreaker(settings.breaker.failure_threshold, settings.breaker.reset_after_s)
    return TipGenerator(
        settings, split=split, completer=completer, breaker=breaker, metrics=metrics
    )
