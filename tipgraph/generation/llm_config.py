"""Read ``configs/llm.yaml`` (LiteLLM's own ``model_list`` format) into Router arguments.

The same file works for the LiteLLM proxy.  One thing is decided here: a model whose
``api_key`` comes from an environment variable that is not set is *opt-in* and is dropped,
together with every fallback that points at it, so a cloud fallback is active only when
its key is present.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "os.environ/"


class LLMConfigError(ValueError):
    """configs/llm.yaml is missing, malformed, or lacks a required alias."""


@dataclass(frozen=True)
class LLMConfig:
    model_list: list[dict[str, Any]]
    router_settings: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def target(self, alias: str) -> str | None:
        """The model behind an alias, e.g. ``ollama_chat/llama3.2:3b``."""
        for entry in self.model_list:
            if entry["model_name"] == alias:
                return str(entry["litellm_params"]["model"])
        return None

    def fallbacks(self, alias: str) -> list[str]:
        """The aliases the Router falls back to when ``alias`` fails, in order."""
        return [
            target
            for rule in self.router_settings.get("fallbacks") or ()
            for target in rule.get(alias, ())
        ]

    def router_kwargs(self) -> dict[str, Any]:
        return {"model_list": self.model_list, **self.router_settings}


def _missing_key(params: Mapping[str, Any], environ: Mapping[str, str]) -> str | None:
    key = params.get("api_key")
    if isinstance(key, str) and key.startswith(ENV_PREFIX):
        name = key[len(ENV_PREFIX) :]
        if not environ.get(name):
            return name
    return None


def load_llm_config(
    path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
) -> LLMConfig:
    environ = os.environ if environ is None else environ
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as err:
        raise LLMConfigError(f"cannot read LLM config {path}: {err}") from err
    entries = data.get("model_list")
    if not isinstance(entries, list) or not entries:
        raise LLMConfigError(f"{path}: model_list must be a non-empty list")
    kept: list[dict[str, Any]] = []
    dropped: list[str] = []
    for index, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or "model_name" not in entry
            or not isinstance(entry.get("litellm_params"), dict)
            or "model" not in entry["litellm_params"]
        ):
            raise LLMConfigError(
                f"{path}: model_list[{index}] needs model_name and litellm_params.model"
            )
        if _missing_key(entry["litellm_params"], environ):
            dropped.append(entry["model_name"])
        else:
            kept.append(entry)
    router = dict(data.get("router_settings") or {})
    if "fallbacks" in router:
        router["fallbacks"] = _prune_fallbacks(router["fallbacks"], set(dropped))
        if not router["fallbacks"]:
            del router["fallbacks"]
    return LLMConfig(kept, router, dropped)


def _prune_fallbacks(
    fallbacks: list[dict[str, list[str]]], dropped: set[str]
) -> list[dict[str, list[str]]]:
    pruned = []
    for rule in fallbacks:
        for alias, targets in rule.items():
            if alias in dropped:
                continue
            alive = [t for t in targets if t not in dropped]
            if alive:
                pruned.append({alias: alive})
    return pruned
