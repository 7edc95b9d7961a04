"""The configuration reference (docs/configuration.md), generated from the settings model.

``tipgraph render-config-docs`` writes it; a test fails when the committed file drifts
from :class:`tipgraph.settings.TipgraphSettings`, so the reference cannot go stale.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from tipgraph.settings import TipgraphSettings

HEADER = """# Configuration reference

Generated from `tipgraph/settings.py` by `tipgraph render-config-docs`; do not edit.

Values come from `configs/tipgraph.yaml` (or `--config` / `$TIPGRAPH_CONFIG`), and any key
can be overridden from the environment: the variable name is `TIPGRAPH_` followed by
the key's path in upper case, with `__` between levels. `shadows` is a list: set it in the
YAML file, or replace it whole with `TIPGRAPH_SHADOWS='[...]'` (JSON). `tipgraph config
show` prints the effective values, with secrets masked. The defaults below are the
model's; `configs/tipgraph.yaml` sets some keys to other values (the shadows, the
deployments' Serve options, the batching of hops).

"""


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is Ellipsis:
        return "..."
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any, parent: BaseModel | None, name: str) -> str:
    if parent is not None:  # the enclosing section's default instance says more
        value = getattr(parent, name)
    elif field.default is PydanticUndefined:
        return "computed" if field.default_factory is not None else "required"
    else:
        value = field.default
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{value!r}`"


def rows(
    model: type[BaseModel],
    prefix: str = "",
    env: str | None = "TIPGRAPH",
    parent: BaseModel | None = None,
) -> Iterator[tuple[str, str, str, str, str]]:
    """(key, type, default, environment variable, description) for every leaf setting;
    ``parent`` is the section's default instance, when it has one."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        variable = f"{env}__{name.upper()}" if env and prefix else f"{env}_{name.upper()}"
        annotation = field.annotation
        args = typing.get_args(annotation)
        if _is_model(annotation):
            default = getattr(parent, name) if parent is not None else field.default
            yield from rows(
                typing.cast(type[BaseModel], annotation),
                f"{key}.",
                variable if env else None,
                default if isinstance(default, BaseModel) else None,
            )
        elif typing.get_origin(annotation) is dict and args and _is_model(args[1]):
            yield from rows(args[1], f"{key}.<name>.", f"{variable}__<NAME>" if env else None)
        elif typing.get_origin(annotation) is list and args and _is_model(args[0]):
            yield from rows(args[0], f"{key}[].", None)
        else:
            yield (
                key,
                _type_name(annotation),
                _default(field, parent, name),
                f"`{variable}`" if env else "—",
                (field.description or "").replace("|", "\\|"),
            )


def render_config_docs() -> str:
    lines = [
        "| key | type | default | environment | description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, type_name, default, variable, description in rows(TipgraphSettings):
        lines.append(f"| `{key}` | {type_name} | {default} | {variable} | {description} |")
    return HEADER + "\n".join(lines) + "\n"
