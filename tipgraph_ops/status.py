"""``tipgraph status``: what is running and how far behind it is, in one screen.

Three independent sources, each reported even when another is unreachable:

* the Serve applications on the Ray cluster (status, every deployment's replica counts);
* the model registry (champion and challenger versions, whether serving follows an alias);
* the ingress's ``/readyz`` (decision-log backlog and spill of the replica that answers) and
  the decision store's row counts.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from tipgraph.guardrails import evaluate_guardrails
from tipgraph.registry import CHALLENGER, CHAMPION, PolicyRegistry, registry_exists
from tipgraph.settings import TipgraphSettings
from tipgraph.store import StoreError, open_store

HEALTHY_APP = "RUNNING"
AUTH_TOKEN_FILE = Path.home() / ".ray" / "auth_token"


@dataclass
class DeploymentState:
    name: str
    status: str
    replicas: dict[str, int]
    """Replica count per state (RUNNING, STARTING, ...), as Serve reports them."""
    message: str = ""


@dataclass
class ApplicationState:
    name: str
    status: str
    message: str
    deployments: list[DeploymentState]


@dataclass
class Section:
    """One source's findings, or why it could not be read."""

    ok: bool
    error: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Status:
    serve: Section
    registry: Section
    decision_log: Section

    @property
    def healthy(self) -> bool:
        return self.serve.ok and self.registry.ok and self.decision_log.ok

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "healthy": self.healthy}


def _name(value: object) -> str:
    """An enum member's value (``RUNNING``), not its repr (``ReplicaState.RUNNING``)."""
    return str(getattr(value, "value", value))


PROBE_TIMEOUT_S = 3.0


def _unreachable(ray_address: str) -> str | None:
    """Why nothing answers at ``HOST:PORT`` (None: something does).  Probed first because
    Ray's own client retries an absent cluster for minutes before it gives up."""
    host, _, port = ray_address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None  # not HOST:PORT: let Ray judge it
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err}"


def serve_status(ray_address: str) -> Section:
    """Every Serve application on the cluster at ``ray_address`` ("auto": the local one)."""
    if ray_address != "auto" and (problem := _unreachable(ray_address)) is not None:
        return Section(
            ok=False,
            error=f"no Ray cluster at {ray_address} ({problem}); is `tipgraph serve` running?",
        )
    if ray_address != "auto" and (AUTH_TOKEN_FILE.exists() or "RAY_AUTH_TOKEN" in os.environ):
        # Ray only detects a local cluster's token auth for "auto"; an explicit address to
        # such a cluster would otherwise be refused as unauthenticated.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray  # after RAY_AUTH_MODE is set, which Ray reads as it connects
    from ray import serve

    try:
        if not ray.is_initialized():
            ray.init(address=ray_address, log_to_driver=False, logging_level=logging.ERROR)
        status = serve.status()
    except (ConnectionError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Section(
            ok=False,
            error=f"no Ray cluster at {ray_address} ({first_line}); is `tipgraph serve` running?",
        )
    apps = [
        ApplicationState(
            name=name,
            status=_name(app.status),
            message=app.message,
            deployments=[
                DeploymentState(
                    name=dep_name,
                    status=_name(dep.status),
                    replicas={_name(state): count for state, count in dep.replica_states.items()},
                    message=dep.message,
                )
                for dep_name, dep in sorted(app.deployments.items())
            ],
        )
        for name, app in sorted(status.applications.items())
    ]
    if not apps:
        return Section(ok=False, error="Serve is running no application", data={"apps": []})
    unhealthy = [app.name for app in apps if app.status != HEALTHY_APP]
    return Section(
        ok=not unhealthy,
        error=f"not {HEALTHY_APP}: {', '.join(unhealthy)}" if unhealthy else None,
        data={"apps": [asdict(app) for app in apps]},
    )


def registry_status(settings: TipgraphSettings) -> Section:
    from mlflow.exceptions import MlflowException  # heavy: loaded only to read the registry

    registry_settings = settings.registry
    data: dict[str, Any] = {
        "model": registry_settings.model_name,
        "serving_follows": registry_settings.serve_alias,
    }
    if not registry_exists(registry_settings.tracking_uri):
        # Opening it would create an empty registry: a status check must not write.
        return Section(ok=True, data={**data, CHAMPION: None, CHALLENGER: None})
    try:
        registry = PolicyRegistry(
            registry_settings.tracking_uri, model_name=registry_settings.model_name
        )
        data[CHAMPION] = registry.version_of(CHAMPION)
        data[CHALLENGER] = registry.version_of(CHALLENGER)
    except (MlflowException, OSError) as err:
        return Section(ok=False, error=f"model registry unreachable: {err}", data=data)
    return Section(ok=True, data=data)


def decision_log_status(
    settings: TipgraphSettings, url: str, *, timeout_s: float = 10.0
) -> Section:
    """The answering ingress replica's buffer (``/readyz``) and the store's row counts."""

    data: dict[str, Any] = {}
    errors = []
    try:
        response = httpx.get(f"{url.rstrip('/')}/readyz", timeout=timeout_s)
        ready = response.json()
        for key in (
            "decision_log_backlog",
            "decision_log_spilled",
            "decision_log_dead_letters",
            "feedback_held",
        ):
            data[key] = ready.get(key)
        if response.status_code != 200:
            errors.append(f"{url}/readyz answered {response.status_code}: {ready.get('detail')}")
    except (httpx.HTTPError, ValueError) as err:
        errors.append(f"ingress unreachable at {url}/readyz: {err}")
    try:
        with open_store(settings.store) as store:
            counts = store.counts()
            guardrails = evaluate_guardrails(store, settings.experiment, datetime.now(UTC))
        data["stored"] = {
            "decisions": counts.decisions,
            "rewards": counts.rewards,
            "default_rewards": counts.default_rewards,
            "feedback": counts.feedback,
        }
        data["guardrails"] = [
            {"name": g.name, "crossed": g.crossed, "evidence": g.evidence} for g in guardrails
        ]
        errors += [f"guardrail {g.name} crossed: {g.evidence}" for g in guardrails if g.crossed]
    except (StoreError, OSError) as err:
        errors.append(f"decision store unreachable: {err}")
    return Section(ok=not errors, error="; ".join(errors) or None, data=data)


def collect(settings: TipgraphSettings, *, ray_address: str, url: str) -> Status:
    return Status(
        serve=serve_status(ray_address),
        registry=registry_status(settings),
        decision_log=decision_log_status(settings, url),
    )


def format_status(status: Status) -> str:
    lines = []

    def header(title: str, section: Section) -> None:
        mark = "ok" if section.ok else f"PROBLEM: {section.error}"
        lines.append(f"{title}: {mark}")

    header("Serve", status.serve)
    for app in status.serve.data.get("apps", []):
        lines.append(f"  application {app['name']}: {app['status']} {app['message']}".rstrip())
        for dep in app["deployments"]:
            replicas = ", ".join(f"{n} {state}" for state, n in sorted(dep["replicas"].items()))
            lines.append(f"    {dep['name']:<24} {dep['status']:<10} replicas: {replicas or '0'}")

    header("Model registry", status.registry)
    registry = status.registry.data
    if registry:
        follows = registry.get("serving_follows")
        lines.append(
            f"  {registry['model']}: champion version {registry.get('champion') or 'none'}, "
            f"challenger version {registry.get('challenger') or 'none'}; serving "
            + (f"follows @{follows}" if follows else "uses the configured policy (no alias)")
        )

    header("Decision log", status.decision_log)
    log = status.decision_log.data
    if "decision_log_backlog" in log:
        lines.append(
            f"  answering ingress replica: backlog {log['decision_log_backlog']} decisions, "
            f"{log['decision_log_spilled']} spilled, {log['feedback_held']} feedback held, "
            f"{log.get('decision_log_dead_letters') or 0} dead-lettered"
        )
    if "stored" in log:
        stored = log["stored"]
        lines.append(
            f"  store: {stored['decisions']} decisions, {stored['rewards']} rewards "
            f"({stored['default_rewards']} default), {stored['feedback']} feedback"
        )
    for guardrail in log.get("guardrails", []):
        mark = "CROSSED" if guardrail["crossed"] else "ok"
        lines.append(f"  guardrail {guardrail['name']}: {mark}: {guardrail['evidence']}")
    return "\n".join(lines)
