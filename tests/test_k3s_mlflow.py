"""The k3s MLflow server, run locally with the exact command of its manifest.

The command and environment come from the rendered ``mlflow`` Deployment. Only the
addresses change: the local Postgres instead of the ``postgres`` Service, a free port, and
a temporary directory for the artifacts. So the basic-auth app, the ``/mlflow`` prefix, the
allowed hosts and the Postgres backend are the ones the cluster runs, and tipgraph's
registry client works against them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from psycopg import sql

from tests.conftest import free_port
from tipgraph.features import FEATURE_SPEC
from tipgraph.policies import make_policy
from tipgraph.registry import CHAMPION, Baseline, OffPolicyEvidence, PolicyRegistry
from tipgraph.settings import LinUCBSettings
from tipgraph_ops.k3s import kustomize_build

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[1]
ADMIN, PASSWORD = "admin", "k3s-test-password"


def mlflow_container() -> dict[str, Any]:
    (deployment,) = [
        d
        for d in kustomize_build(REPO / "k3s" / "overlays" / "prod")
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"
    ]
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def local_command(command: list[str], *, database_url: str, port: int, tmp: Path) -> list[str]:
    """The manifest's command with this machine's addresses."""
    local = {
        "--backend-store-uri": database_url,
        "--artifacts-destination": str(tmp / "artifacts"),
        "--host": "127.0.0.1",
        "--port": str(port),
        "--allowed-hosts": f"127.0.0.1:{port}",
    }
    replaced = []
    for arg in command[1:]:
        name = arg.split("=", 1)[0]
        replaced.append(f"{name}={local[name]}" if name in local else arg)
    assert command[0] == "mlflow"
    return [str(Path(sys.executable).parent / "mlflow"), *replaced]


@pytest.fixture
def mlflow_server(postgres_url: str, tmp_path: Path) -> Iterator[str]:
    container = mlflow_container()
    database = f"mlflow_k3s_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    info = psycopg.conninfo.conninfo_to_dict(postgres_url)
    database_url = (
        f"postgresql+psycopg://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}:"
        f"{info.get('port', 5432)}/{database}"
    )
    auth_ini = tmp_path / "basic_auth.ini"
    auth_ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'basic_auth.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
        encoding="utf-8",
    )
    env = {**os.environ, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-key"}
    names = {e["name"] for e in container["env"]}
    assert {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"} <= names
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_ini)
    port = free_port()
    command = local_command(
        container["command"], database_url=database_url, port=port, tmp=tmp_path
    )
    log = open(tmp_path / "mlflow.log", "wb")  # noqa: SIM115 - closed in the finally
    server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        probe = container["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(base + probe, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail((tmp_path / "mlflow.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        server.wait(30)
        log.close()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )


def test_the_k3s_mlflow_server_requires_auth_and_serves_tipgraphs_registry(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    search = "/mlflow/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(mlflow_server + search).status_code == 401
    assert httpx.get(mlflow_server + search, auth=(ADMIN, "wrong")).status_code == 401
    assert httpx.get(mlflow_server + search, auth=(ADMIN, PASSWORD)).status_code == 200
    # A Host header outside --allowed-hosts is refused (DNS-rebinding protection).
    rebound = httpx.get(
        mlflow_server + search, auth=(ADMIN, PASSWORD), headers={"Host": "evil.example"}
    )
    assert rebound.status_code in (400, 403), rebound.status_code

    # tipgraph's registry, with the credentials the pods get from the Secret.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    registry = PolicyRegistry(f"{mlflow_server}/mlflow")
    policy = make_policy(
        LinUCBSettings(name="linucb"),
        FEATURE_SPEC.dim,
        spec_version=FEATURE_SPEC.version,
    )
    rng = np.random.default_rng(0)
    for _ in range(50):
        policy.update(rng.normal(size=FEATURE_SPEC.dim), float(rng.random()))
    policy.stats_.refresh()
    version = registry.register(
        policy,
        OffPolicyEvidence("progressive dr", 0.6, 0.55, 0.65, 50),
        baseline=Baseline(
            "served policy linucb (linucb)",
            OffPolicyEvidence("progressive dr", 0.5, 0.45, 0.55, 50),
            champion_version=None,
        ),
    )
    assert registry.promote().startswith(f"challenger version {version} lower bound 0.5500 beats")
    loaded = registry.load(f"@{CHAMPION}", expected_spec_version=FEATURE_SPEC.version)
    assert loaded.version == version
    X = rng.normal(size=(5, FEATURE_SPEC.dim))
    np.testing.assert_array_equal(loaded.policy.distribution(X, "e"), policy.distribution(X, "e"))
