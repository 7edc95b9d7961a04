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


def _model_union(annotation: Any) -> tuple[type[BaseModel], ...]:
    """The member models of a union of models (a tagged union like ``PolicySettings``)."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return ()
    members = typing.get_args(annotation)
    return members if all(_is_model(m) for m in members) else ()


def _union_rows(
    members: tuple[type[BaseModel], ...], prefix: str, env: str | None, parent: BaseModel | None
) -> Iterator[tuple[str, str, str, str, str]]:
    """One row per field of any member; a field not every member has names its kinds."""
    kinds = {m: str(m.model_fields["kind"].default) for m in members}
    seen: dict[str, list[type[BaseModel]]] = {}
    for member in members:
        for name in ("name", "kind", *member.model_fields):
            if member not in seen.setdefault(name, []):
                seen[name].append(member)
    for name, owners in seen.items():
        field = owners[0].model_fields[name]
        if name == "kind":
            annotation: Any = typing.Literal[tuple(kinds[m] for m in members)]
        else:
            annotation = field.annotation
        variable = f"`{env}__{name.upper()}`" if env else "—"
        scope = "" if len(owners) == len(members) else f"({', '.join(kinds[m] for m in owners)}) "
        description = (field.description or "").replace("|", "\\|")
        if scope and description.startswith(f"{kinds[owners[0]]}: "):
            description = description.split(": ", 1)[1]
        owner = parent if parent is not None and type(parent) in owners else None
        # Each member's kind has a default (its own tag); the union's kind does not.
        default = "required" if name == "kind" and parent is None else _default(field, owner, name)
        yield (
            f"{prefix}{name}",
            _type_name(annotation),
            default,
            variable,
            f"{scope}{description}",
        )


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
        elif members := _model_union(annotation):
            default = getattr(parent, name) if parent is not None else field.default
            yield from _union_rows(
                members,
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
