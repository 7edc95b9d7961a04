"""The k3s manifests: serveConfigV2 rendered from the settings, and kustomize builds in Python.

``configs/tipgraph.yaml`` stays the one source of truth.  Each overlay in :data:`OVERLAYS`
merges its ``configs/k3s/*.yaml`` on top of it; the resulting settings render the
RayService's ``serveConfigV2`` into ``k3s/overlays/<env>/serve-config.patch.yaml`` (``make
render-k3s``), and a test fails when a committed patch drifts from what the configs say.

:func:`kustomize_build` renders an overlay the way ``kubectl kustomize`` does, for the subset
of kustomize the manifests use (``resources``, ``namespace``, ``labels``, ``images``, and
``patches`` as JSON 6902 operations).  Any other kustomization field is refused rather than
ignored, so the offline validation never checks something other than what a cluster gets.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tipgraph.serve_config import render_serve_config
from tipgraph.settings import TipgraphSettings, load_settings

BASE_CONFIG = "configs/tipgraph.yaml"
OVERLAYS: dict[str, tuple[str, ...]] = {
    "dev": ("configs/k3s/base.yaml", "configs/k3s/dev.yaml"),
    "prod": ("configs/k3s/base.yaml", "configs/k3s/prod.yaml"),
}
SERVE_PATCH = "serve-config.patch.yaml"
PATCH_HEADER = (
    "# Generated from {sources} by `tipgraph render-k3s`; do not edit.\n"
    "# The RayService's serveConfigV2: the same renderer as serve_config.yaml.\n"
)
KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "patches",
}
CLUSTER_SCOPED = {"Namespace", "StorageClass", "ClusterRole", "ClusterRoleBinding"}


class KustomizeError(ValueError):
    """A kustomization this renderer cannot build exactly as kustomize would."""


# -- serveConfigV2 ---------------------------------------------------------------------------
def overlay_settings(root: Path, env: str) -> TipgraphSettings:
    return load_settings(root / BASE_CONFIG, [root / o for o in OVERLAYS[env]])


def serve_config_v2(settings: TipgraphSettings, overlays: Iterable[str]) -> str:
    """The Serve config a RayService runs: the app builder gets the same config + overlays."""
    config = render_serve_config(settings, BASE_CONFIG)
    for app in config["applications"]:
        app["args"]["overlays"] = list(overlays)
    return yaml.safe_dump(config, sort_keys=False)


def generated_files(root: Path) -> dict[Path, str]:
    """Every file ``tipgraph render-k3s`` writes, path -> content."""
    files = {}
    for env, overlays in OVERLAYS.items():
        text = serve_config_v2(overlay_settings(root, env), overlays)
        patch = [{"op": "add", "path": "/spec/serveConfigV2", "value": text}]
        header = PATCH_HEADER.format(sources=", ".join((BASE_CONFIG, *overlays)))
        body = yaml.dump(patch, Dumper=_BlockDumper, sort_keys=False, width=100)
        files[root / "k3s" / "overlays" / env / SERVE_PATCH] = header + body
    return files


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as ``|`` blocks, so the embedded Serve config stays readable."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


# -- JSON 6902 -----------------------------------------------------------------------------------
def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"a JSON pointer starts with '/', got {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], part: str, path: str, *, append: bool) -> int:
    if append and part == "-":
        return len(container)
    if not part.isdigit() or int(part) > len(container) - (0 if append else 1):
        raise KustomizeError(f"{path}: index {part!r} is outside a list of {len(container)}")
    return int(part)


def apply_json_patch(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add`` / ``replace`` / ``remove`` on a copy of ``document``."""
    result = copy.deepcopy(document)
    for operation in operations:
        op, path = operation.get("op"), str(operation.get("path", ""))
        if op not in ("add", "replace", "remove"):
            raise KustomizeError(f"unsupported patch op {op!r} (add, replace, remove)")
        *parents, last = _pointer(path)
        node: Any = result
        for part in parents:
            if isinstance(node, list):
                node = node[_index(node, part, path, append=False)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise KustomizeError(f"{path}: {part!r} does not exist")
        if isinstance(node, list):
            index = _index(node, last, path, append=op == "add")
            if op == "add":
                node.insert(index, copy.deepcopy(operation["value"]))
            elif op == "replace":
                node[index] = copy.deepcopy(operation["value"])
            else:
                del node[index]
        elif isinstance(node, dict):
            if op != "add" and last not in node:
                raise KustomizeError(f"{path}: cannot {op} {last!r}, it does not exist")
            if op == "remove":
                del node[last]
            else:
                node[last] = copy.deepcopy(operation["value"])
        else:
            raise KustomizeError(f"{path}: the parent is not an object or a list")
    return result


# -- kustomize -----------------------------------------------------------------------------------
def load_documents(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        documents = [d for d in yaml.safe_load_all(handle) if d is not None]
    for document in documents:
        if not isinstance(document, dict) or "kind" not in document:
            raise KustomizeError(f"{path}: every document must be a Kubernetes object")
    return documents


def _matches(document: dict[str, Any], target: dict[str, Any]) -> bool:
    metadata = document.get("metadata", {})
    return all(
        (key == "kind" and document.get("kind") == value)
        or (key == "name" and metadata.get("name") == value)
        for key, value in target.items()
    )


def _set_images(node: Any, images: list[dict[str, Any]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                name = value.rsplit(":", 1)[0] if ":" in value.rsplit("/", 1)[-1] else value
                for image in images:
                    if image["name"] == name:
                        node[key] = f"{image.get('newName', name)}:{image['newTag']}"
            else:
                _set_images(value, images)
    elif isinstance(node, list):
        for item in node:
            _set_images(item, images)


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize directory`` prints, for the supported subset."""
    kustomization_path = directory / "kustomization.yaml"
    with open(kustomization_path, encoding="utf-8") as handle:
        kustomization = yaml.safe_load(handle) or {}
    unknown = sorted(set(kustomization) - KUSTOMIZATION_FIELDS)
    if unknown:
        raise KustomizeError(f"{kustomization_path}: unsupported field(s) {unknown}")
    documents: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        documents += kustomize_build(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        target = patch.get("target") or {}
        if not target:
            raise KustomizeError(f"{kustomization_path}: a patch needs a target")
        if "path" in patch:
            with open(directory / patch["path"], encoding="utf-8") as handle:
                operations = yaml.safe_load(handle)
        else:
            operations = yaml.safe_load(patch["patch"])
        if not isinstance(operations, list):
            raise KustomizeError(
                f"{kustomization_path}: only JSON 6902 patches (a list of operations) are "
                f"supported, got {type(operations).__name__}"
            )
        hits = [i for i, d in enumerate(documents) if _matches(d, target)]
        if not hits:
            raise KustomizeError(f"{kustomization_path}: patch target {target} matches nothing")
        for i in hits:
            documents[i] = apply_json_patch(documents[i], operations)
    namespace = kustomization.get("namespace")
    for document in documents:
        metadata = document.setdefault("metadata", {})
        if namespace and document["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = namespace
        for label in kustomization.get("labels", []):
            metadata.setdefault("labels", {}).update(label.get("pairs", {}))
    _set_images(documents, kustomization.get("images", []))
    return documents
