"""Turn an LLM answer into validated candidate tips, dropping (and counting) bad items."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tipgraph.contracts import TipKind
from tipgraph.text import clean_text


class LLMTip(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    content: str
    kind: TipKind
    task_id: str | None = None

    @field_validator("content", "task_id", mode="before")
    @classmethod
    def _safe(cls, value: object) -> object:
        # A model's text is cleaned, not refused: the rest of the tip is still good.
        return clean_text(value) if isinstance(value, str) else value


class MalformedAnswer(ValueError):
    """The answer as a whole is not the JSON we asked for."""


@dataclass
class ParsedTips:
    tips: list[LLMTip]
    dropped: Counter[str] = field(default_factory=Counter)


def _items(text: str) -> list[Any]:
    cleaned = text.strip()
    if cleaned.startswith("```"):  # models like to fence JSON in markdown
        cleaned = cleaned.strip("`")
        cleaned = cleaned[cleaned.find("\n") + 1 :] if "\n" in cleaned else cleaned
    try:
        data = json.loads(cleaned)
    except json.JSONDecodeError as err:
        raise MalformedAnswer(f"answer is not JSON ({err.msg} at char {err.pos})") from err
    if isinstance(data, dict) and isinstance(data.get("tips"), list):
        return list(data["tips"])
    if isinstance(data, list):
        return data
    raise MalformedAnswer('answer is JSON but neither {"tips": [...]} nor a list')


def parse_tips(text: str, *, task_ids: Collection[str], max_chars: int) -> ParsedTips:
    """Validated, distinct tips; every dropped item is counted by reason."""
    parsed = ParsedTips([])
    seen: set[str] = set()
    for item in _items(text):
        if not isinstance(item, dict):
            parsed.dropped["not_an_object"] += 1
            continue
        try:
            tip = LLMTip.model_validate(item)
        except ValidationError:
            parsed.dropped["invalid"] += 1
            continue
        key = " ".join(tip.content.lower().split())
        if not key:
            parsed.dropped["empty"] += 1
        elif len(tip.content) > max_chars:
            parsed.dropped["too_long"] += 1
        elif key in seen:
            parsed.dropped["duplicate"] += 1
        else:
            seen.add(key)
            if tip.task_id is not None and tip.task_id not in task_ids:
                tip = tip.model_copy(update={"task_id": None})  # keep the tip, not the link
                parsed.dropped["unknown_task_id_cleared"] += 1
            parsed.tips.append(tip)
    return parsed
