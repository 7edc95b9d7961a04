"""The tipgraph Serve application: ingress -> context -> generation -> scoring (+ shadows,
one deployment for every shadow policy); generation -> pool when it serves LLM tips from
the candidate pool; bus (-> scoring, shadows) when reactions come from the event bus or
decisions go to it.

``serve run serve_config.yaml`` imports :func:`build_app`; tests and ``tipgraph serve``
call :func:`build_graph` with settings they already hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from ray.serve import Application, Deployment

from deployments.bus import BusReplica
from deployments.context import ContextBuilder
from deployments.generation import CandidateGenerator
from deployments.ingress import Ingress
from deployments.pool import PoolRefiller
from deployments.scoring import PolicyScorer
from deployments.shadows import ShadowPolicies
from tipgraph.serve_config import all_deployment_options
from tipgraph.settings import (
    BUS_DEPLOYMENT,
    POOL_DEPLOYMENT,
    SHADOWS_DEPLOYMENT,
    TipgraphSettings,
    load_settings,
    resolve_paths,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _deployment(decorated: object) -> Deployment:
    # @serve.deployment returns a Deployment at run time; type checkers still see the class.
    return cast(Deployment, decorated)


def build_graph(settings: TipgraphSettings) -> Application:
    options = all_deployment_options(settings)
    context = _deployment(ContextBuilder).options(**options["context"]).bind(settings)
    pool = (
        _deployment(PoolRefiller).options(**options[POOL_DEPLOYMENT]).bind(settings)
        if settings.generation.pooled
        else None
    )
    generation = (
        _deployment(CandidateGenerator).options(**options["generation"]).bind(settings, pool)
    )
    scoring = (
        _deployment(PolicyScorer)
        .options(**options["scoring"])
        .bind(settings, settings.policy, follow_registry=True)
    )
    shadows = (
        _deployment(ShadowPolicies).options(**options[SHADOWS_DEPLOYMENT]).bind(settings)
        if settings.shadows
        else None
    )
    bus = (
        _deployment(BusReplica).options(**options[BUS_DEPLOYMENT]).bind(settings, scoring, shadows)
        if settings.bus.deployed
        else None
    )
    return (
        _deployment(Ingress)
        .options(**options["ingress"])
        .bind(settings, context, generation, scoring, shadows, bus)
    )


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files.

    ``args: {config: configs/tipgraph.yaml, overlays: [configs/k3s/prod.yaml]}``; relative
    paths are taken from the project root when they do not exist where Serve runs.
    """
    config = _project_path(str(args.get("config", "configs/tipgraph.yaml")))
    overlays = [_project_path(str(o)) for o in args.get("overlays") or ()]
    return build_graph(resolve_paths(load_settings(config, overlays), PROJECT_ROOT))


def _project_path(path: str) -> Path:
    # Serve may build the app from another working directory than the CLI's.
    candidate = Path(path)
    if not candidate.is_absolute() and not candidate.exists():
        return PROJECT_ROOT / candidate
    return candidate
