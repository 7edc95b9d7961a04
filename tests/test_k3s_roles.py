"""The Postgres roles of the k3s deployment (k3s/base/postgres.yaml), created by the
ConfigMap's own script on a real Postgres: each role can do what its workload needs and
nothing else."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.test_k3s import one
from tipgraph.store import PostgresStore

pytestmark = pytest.mark.postgres

ROLES = ("tipgraph_app", "tipgraph_tuning", "mlflow")


def _init_files() -> dict[str, str]:
    data: dict[str, str] = one("overlays/prod", "ConfigMap", "postgres-init")["data"]
    return data


def test_the_init_script_passes_every_variable_the_roles_need() -> None:
    files = _init_files()
    used = set(re.findall(r":['\"](\w+)['\"]", files["roles.psql"])) - {"DBNAME"}
    passed = set(re.findall(r"-v (\w+)=", files["10-roles.sh"]))
    assert used and used == passed - {"ON_ERROR_STOP"}
    assert "-f /docker-entrypoint-initdb.d/roles.psql" in files["10-roles.sh"]


def _drop_roles(admin_url: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for role in ROLES:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            if exists:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def roles(postgres_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A fresh database set up by roles.psql, as the image would on first start; the
    conninfo of the app's database and of MLflow's, per role."""
    psql = shutil.which("psql")
    if psql is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("psql is missing")
        pytest.skip("no psql here")
    suffix = uuid.uuid4().hex[:8]
    app_db, mlflow_db = f"k3s_app_{suffix}", f"k3s_mlflow_{suffix}"
    _drop_roles(postgres_url)  # a run that died before its cleanup
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(app_db)))
    script = tmp_path / "roles.psql"
    script.write_text(_init_files()["roles.psql"], encoding="utf-8")
    app_url = make_conninfo(postgres_url, dbname=app_db)
    try:
        subprocess.run(
            [psql, "-v", "ON_ERROR_STOP=1", "-d", app_url, "-q", "-f", str(script)]
            + [f"-v{name}_password=unused-with-trust-auth" for name in ("app", "tuning", "mlflow")]
            + [f"-vmlflow_db={mlflow_db}"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield {
            "app": make_conninfo(app_url, user="tipgraph_app"),
            "tuning": make_conninfo(app_url, user="tipgraph_tuning"),
            "mlflow_on_app": make_conninfo(app_url, user="mlflow"),
            "mlflow": make_conninfo(app_url, user="mlflow", dbname=mlflow_db),
        }
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            for db in (app_db, mlflow_db):
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
                )
        _drop_roles(postgres_url)


def test_each_role_can_do_its_job_and_nothing_more(roles: dict[str, str]) -> None:
    # The app migrates its own schema (configs/k3s/base.yaml: pg_schema tipgraph).
    app = PostgresStore(roles["app"], schema="tipgraph")
    app.open()
    app.close()
    with psycopg.connect(roles["app"], autocommit=True) as conn:
        conn.execute("SELECT COUNT(*) FROM tipgraph.decisions")
        for statement in ("CREATE SCHEMA elsewhere", "CREATE TABLE public.t (x int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)

    # The tuning job reads the decision log, tables made after the grant included, and
    # can write nothing; it opens the store without migrating.
    tuning = PostgresStore(roles["tuning"], schema="tipgraph", migrate=False)
    tuning.open()
    assert tuning.logged_events() == []
    # The guardrails CronJob's reads, as the same role.
    assert tuning.outcomes_since(datetime(2026, 1, 1, tzinfo=UTC)) == {}
    tuning.close()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        PostgresStore(roles["tuning"], schema="tipgraph").open()
    with psycopg.connect(roles["tuning"], autocommit=True) as conn:
        conn.execute("SELECT COUNT(*) FROM tipgraph.feedback")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM tipgraph.decisions")

    # MLflow owns its database and cannot even connect to the app's.
    with psycopg.connect(roles["mlflow"], autocommit=True) as conn:
        conn.execute("CREATE TABLE experiments (id int)")
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(roles["mlflow_on_app"]).close()
    assert conninfo_to_dict(roles["mlflow"])["user"] == "mlflow"
