"""`tipgraph config show` and `tipgraph migrate`: what operators run before anything else."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import free_port
from tests.test_store import make_decision, make_feedback
from tipgraph.settings import StoreSettings
from tipgraph.store import open_store
from tipgraph.store.migrate import load_migrations
from tipgraph_ops import cli
from tipgraph_ops.cli import EXIT_DRIFT, EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tipgraph.yaml")


def test_config_show_prints_the_effective_config_with_every_secret_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIPGRAPH_API_TOKEN", "token-abc123")
    monkeypatch.setenv("TIPGRAPH_PRIVACY__USER_KEY_SECRET", "hmac-key-xyz-long-enough-to-be-kept")
    monkeypatch.setenv("TIPGRAPH_STORE__URL", "postgresql://tipgraph:hunter2@db:5432/tipgraph")
    monkeypatch.setenv("TIPGRAPH_HOPS__SCORING__MAX_BATCH_SIZE", "7")

    assert main(["--config", CONFIG, "config", "show"]) == EXIT_OK
    out = capsys.readouterr().out
    for secret in ("token-abc123", "hmac-key-xyz", "hunter2"):
        assert secret not in out
    shown = yaml.safe_load(out)
    assert shown["store"]["url"] == "postgresql://tipgraph:**********@db:5432/tipgraph"
    assert shown["auth"]["api_token"] == "**********"
    assert shown["privacy"]["user_key_secret"] == "**********"
    # The file and the environment, merged: what the services will actually run with.
    assert shown["policy"]["name"] == "linucb"
    assert shown["hops"]["scoring"]["max_batch_size"] == 7
    assert [s["policy"]["name"] for s in shown["shadows"]] == ["egreedy", "uniform"]


def test_config_show_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", CONFIG, "config", "show", "--format", "json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["serve"]["port"] == 8000


def test_overlays_merge_on_the_config_in_order_as_on_the_cluster(
    capsys: pytest.CaptureFixture[str],
) -> None:
    k3s = Path(CONFIG).parent / "k3s"
    overlays = ["--overlay", str(k3s / "base.yaml"), "--overlay", str(k3s / "prod.yaml")]
    assert main(["--config", CONFIG, *overlays, "config", "show", "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["store"]["url"] == "postgresql://tipgraph_app@postgres:5432/tipgraph"  # base
    assert shown["generation"]["source"] == "mixed"  # base over tipgraph.yaml's tasks
    prod = yaml.safe_load((k3s / "prod.yaml").read_text())
    ingress = prod["deployments"]["ingress"]["autoscaling"]
    assert shown["deployments"]["ingress"]["autoscaling"]["max_replicas"] == 8
    assert ingress["max_replicas"] == 8  # prod's own value, not tipgraph.yaml's


def test_config_without_an_action_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["config"])
    assert exit_.value.code == EXIT_USAGE


def test_migrate_brings_a_new_store_to_the_latest_schema_idempotently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "new" / "tipgraph.db"
    monkeypatch.setenv("TIPGRAPH_STORE__URL", f"sqlite:///{db}")
    latest = max(m.version for m in load_migrations("sqlite"))
    for _ in range(2):
        assert main(["--config", CONFIG, "migrate"]) == EXIT_OK
        assert capsys.readouterr().out.strip() == (
            f"decision store sqlite:///{db}: schema version {latest}"
        )
    assert db.exists()


def test_retention_run_deletes_the_expired_decisions_and_keeps_the_rewards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "log.db"
    monkeypatch.setenv("TIPGRAPH_STORE__URL", f"sqlite:///{db}")
    now = datetime.now(UTC)
    with open_store(StoreSettings(url=f"sqlite:///{db}")) as store:
        store.write_decisions(
            [
                make_decision("ancient", created_at=now - timedelta(days=200)),
                make_decision("month-old", created_at=now - timedelta(days=40)),
                make_decision("fresh", created_at=now - timedelta(days=1)),
            ]
        )
        for event_id in ("ancient", "month-old"):
            store.record_feedback(make_feedback(event_id, at=now))
        learned = [(e.features, e.reward) for e in store.training_events()]

    # The configured 180 days, then a shorter run on demand.
    for argv, deleted in (([], 1), (["--days", "30"], 1), (["--days", "30"], 0)):
        assert main(["--config", CONFIG, "retention", "run", *argv]) == EXIT_OK
        out = capsys.readouterr().out
        assert f"deleted {deleted} decisions, {deleted} feedback" in out, out
    with open_store(StoreSettings(url=f"sqlite:///{db}")) as store:
        assert [store.get_decision(e) is None for e in ("ancient", "month-old", "fresh")] == [
            True,
            True,
            False,
        ]
        assert [(e.features, e.reward) for e in store.training_events()] == learned

    forever = tmp_path / "forever.yaml"
    forever.write_text("retention: {days: null}\n")
    assert main(["--config", str(forever), "retention", "run"]) == EXIT_USAGE
    assert "retention.days is not set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["--config", CONFIG, "retention", "run", "--days", "0"])
    assert refused.value.code == EXIT_USAGE
    assert "--days must be >= 1" in capsys.readouterr().err


def test_migrate_against_an_unreachable_database_says_so_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    monkeypatch.setenv("TIPGRAPH_STORE__URL", f"postgresql://nobody:pw@127.0.0.1:{port}/none")
    monkeypatch.setenv("TIPGRAPH_STORE__TIMEOUT_S", "2")
    assert main(["--config", CONFIG, "migrate"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("tipgraph: error:") and "Traceback" not in err
    assert "pw@" not in err


@pytest.fixture(scope="module")
def learned_log(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tipgraph.settings import TipgraphSettings
    from tipgraph.simulator import run_local

    url = f"sqlite:///{tmp_path_factory.mktemp('log')}/log.db"
    run_local(TipgraphSettings(store={"url": url}), users=5, decisions=40, seed=2, block=40)
    return url


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_writes_the_import_format_and_imports_back_to_the_same_events(
    learned_log: str,
    suffix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tipgraph.settings import StoreSettings
    from tipgraph.store import open_store
    from tuning.data import load_log
    from tuning.importer import import_log

    monkeypatch.setenv("TIPGRAPH_STORE__URL", learned_log)
    out = tmp_path / f"decisions{suffix}"
    assert main(["--config", CONFIG, "export", "--out", str(out)]) == EXIT_OK
    assert capsys.readouterr().out.startswith("exported 40 decisions")

    imported = import_log(out).log
    with open_store(StoreSettings(url=learned_log)) as store:
        logged = load_log(store)
    assert imported.n_events == logged.n_events == 40
    assert list(imported.event_id) == list(logged.event_id)
    np.testing.assert_allclose(imported.X, logged.X)
    np.testing.assert_allclose(imported.pscore, logged.pscore)
    np.testing.assert_array_equal(imported.chosen, logged.chosen)
    np.testing.assert_allclose(imported.reward, logged.reward)


def test_export_filters_and_refuses_what_it_cannot_write(
    learned_log: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TIPGRAPH_STORE__URL", learned_log)
    out = str(tmp_path / "x.csv")
    assert main(["--config", CONFIG, "export", "--out", out, "--policy", "nobody"]) == EXIT_ERROR
    assert "no logged decisions match" in capsys.readouterr().err
    assert main(["--config", CONFIG, "export", "--out", out, "--since", "2999-01-01"]) == EXIT_ERROR
    assert main(["--config", CONFIG, "export", "--out", out, "--since", "yesterday"]) == EXIT_ERROR
    assert "Invalid isoformat" in capsys.readouterr().err
    bad = str(tmp_path / "x.xlsx")
    assert main(["--config", CONFIG, "export", "--out", bad]) == EXIT_ERROR
    assert "expected a .csv or .parquet file" in capsys.readouterr().err


def test_export_reports_progress_up_to_every_event(learned_log: str, tmp_path: Path) -> None:
    from tipgraph.settings import StoreSettings
    from tipgraph.store import open_store
    from tuning.export import export_log

    seen: list[int] = []
    with open_store(StoreSettings(url=learned_log)) as store:
        export_log(store, tmp_path / "x.csv", on_progress=seen.append)
    assert seen and seen[-1] == 40
    assert seen == sorted(seen)


def test_report_through_the_cli_names_configured_shadows_without_data(
    learned_log: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TIPGRAPH_STORE__URL", learned_log)
    out = tmp_path / "report"
    assert main(["--config", CONFIG, "report", "--out", str(out)]) == EXIT_OK
    written = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote")]
    assert {Path(line.split()[-1]).name for line in written} == {
        "ope_value.png",
        "reward_over_time.png",
        "shadow_agreement.png",
        "value_by_prompt_version.png",
        "fallback_rate.png",
        "report.html",
        "report.json",
    }
    page = (out / "report.html").read_text(encoding="utf-8")
    # The log was made without shadows; the configured ones are listed with no data.
    shadows = yaml.safe_load(Path(CONFIG).read_text())["shadows"]
    assert shadows and all(s["policy"]["name"] in page for s in shadows)
    assert "no data" in page
    empty = tmp_path / "empty.db"
    monkeypatch.setenv("TIPGRAPH_STORE__URL", f"sqlite:///{empty}")
    assert main(["--config", CONFIG, "report", "--out", str(out)]) == EXIT_ERROR
    assert "no logged decisions with rewards" in capsys.readouterr().err


def test_status_names_every_unreachable_part_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tipgraph.settings import TipgraphSettings
    from tipgraph_ops.status import (
        Section,
        Status,
        decision_log_status,
        format_status,
        registry_status,
        serve_status,
    )

    monkeypatch.chdir(tmp_path)
    registry_db = tmp_path / "mlflow.db"
    settings = TipgraphSettings(
        store={"url": "postgresql://nobody:pw@127.0.0.1:9/none"},
        registry={"tracking_uri": f"sqlite:///{registry_db}"},
    )
    registry = registry_status(settings)
    assert registry.ok and registry.data["champion"] is None
    assert not registry_db.exists()  # a status check never writes

    log = decision_log_status(settings, "http://127.0.0.1:9/app", timeout_s=2)
    assert not log.ok and log.error is not None
    assert "ingress unreachable at http://127.0.0.1:9/app/readyz" in log.error
    assert "decision store unreachable" in log.error

    started = time.monotonic()
    unreachable = serve_status(f"127.0.0.1:{free_port()}")  # Ray itself retries for minutes
    assert time.monotonic() - started < 10
    assert not unreachable.ok and unreachable.error is not None
    assert unreachable.error.startswith("no Ray cluster at 127.0.0.1:")

    serve = Section(ok=False, error="no Ray cluster at auto")
    text = format_status(Status(serve=serve, registry=registry, decision_log=log))
    assert "Serve: PROBLEM: no Ray cluster at auto" in text
    assert "tip-policy: champion version none, challenger version none" in text
    assert "Decision log: PROBLEM: ingress unreachable" in text
    assert Status(serve=serve, registry=registry, decision_log=log).healthy is False


def test_status_lists_applications_with_replica_counts() -> None:
    from tipgraph_ops.status import Section, Status, format_status

    app = {
        "name": "tipgraph",
        "status": "RUNNING",
        "message": "",
        "deployments": [
            {"name": "scoring", "status": "UPSCALING", "replicas": {"RUNNING": 2, "STARTING": 1}}
        ],
    }
    ok = Section(ok=True, data={"apps": [app]})
    registry = Section(
        ok=True,
        data={"model": "tip-policy", "champion": "3", "challenger": "4", "serving_follows": None},
    )
    log = Section(
        ok=True,
        data={
            "decision_log_backlog": 7,
            "decision_log_spilled": 0,
            "decision_log_dead_letters": 2,
            "feedback_held": 1,
            "stored": {"decisions": 10, "rewards": 8, "default_rewards": 2, "feedback": 6},
        },
    )
    text = format_status(Status(serve=ok, registry=registry, decision_log=log))
    assert "application tipgraph: RUNNING" in text
    assert "scoring" in text and "replicas: 2 RUNNING, 1 STARTING" in text
    assert "champion version 3, challenger version 4" in text
    assert "backlog 7 decisions, 0 spilled, 1 feedback held, 2 dead-lettered" in text
    assert "store: 10 decisions, 8 rewards (2 default), 6 feedback" in text


ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "configuration.md"


def test_the_configuration_reference_matches_the_settings_model(tmp_path: Path) -> None:
    assert main(["render-config-docs", "--check", "--out", str(REFERENCE)]) == EXIT_OK
    stale = tmp_path / "configuration.md"
    stale.write_text(REFERENCE.read_text(encoding="utf-8").replace("linger_s", "linger"))
    assert main(["render-config-docs", "--check", "--out", str(stale)]) == EXIT_DRIFT


def test_the_reference_names_variables_that_work_and_never_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tipgraph.settings import load_settings

    text = REFERENCE.read_text(encoding="utf-8")
    assert "tipgraph-dev-only-secret" not in text
    row = next(line for line in text.splitlines() if line.startswith("| `hops.shadows.linger_s`"))
    variable = row.split("`")[5]
    assert variable == "TIPGRAPH_HOPS__SHADOWS__LINGER_S"
    monkeypatch.setenv(variable, "0.2")
    assert load_settings(CONFIG).hops.shadows.linger_s == 0.2
    nested = "TIPGRAPH_DEPLOYMENTS__<NAME>__AUTOSCALING__MAX_REPLICAS"
    assert nested in text
    monkeypatch.setenv(nested.replace("<NAME>", "SCORING"), "2")
    assert load_settings(CONFIG).deployments["scoring"].autoscaling.max_replicas == 2


class _AnswersAfter(BaseHTTPRequestHandler):
    """404 (the proxy has no route yet) for the first ``not_ready`` requests, then 200."""

    not_ready = 3
    seen = 0

    def do_GET(self) -> None:
        type(self).seen += 1
        status = 404 if type(self).seen <= type(self).not_ready else 200
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'{"status":"ready"}' if status == 200 else b"no route")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def route_appears_late() -> Iterator[tuple[str, type[_AnswersAfter]]]:
    handler = type("Handler", (_AnswersAfter,), {"seen": 0})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/readyz", handler
    finally:
        server.shutdown()
        server.server_close()


def test_serve_announces_itself_only_once_its_port_answers_readyz(
    route_appears_late: tuple[str, type[_AnswersAfter]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, handler = route_appears_late
    monkeypatch.setattr(cli, "READY_POLL_S", 0.01)
    cli._wait_until_ready(url, timeout_s=30)
    assert handler.seen == handler.not_ready + 1
    assert capsys.readouterr().err == ""


def test_serve_warns_when_its_port_never_becomes_ready(
    route_appears_late: tuple[str, type[_AnswersAfter]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, handler = route_appears_late
    handler.not_ready = 10**9
    monkeypatch.setattr(cli, "READY_POLL_S", 0.01)
    cli._wait_until_ready(url, timeout_s=0.5)
    err = capsys.readouterr().err
    assert "is still not ready after 0.5 s: 404 no route" in err, err


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_written_a_page_at_a_time_is_the_same_file_and_appears_only_whole(
    learned_log: str, suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace
    from functools import partialmethod

    import pandas as pd

    from tipgraph.settings import StoreSettings
    from tipgraph.store import LoggedEvent, SQLiteStore, open_store
    from tuning.export import export_log

    def read(path: Path) -> pd.DataFrame:
        return pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)

    pages = SQLiteStore.logged_event_pages
    with open_store(StoreSettings(url=learned_log)) as store:
        whole = export_log(store, tmp_path / f"whole{suffix}")
        monkeypatch.setattr(SQLiteStore, "logged_event_pages", partialmethod(pages, page_size=3))
        seen: list[int] = []
        assert export_log(store, tmp_path / f"paged{suffix}", on_progress=seen.append) == whole
        assert seen == [*range(3, 40, 3), 40]
        pd.testing.assert_frame_equal(
            read(tmp_path / f"paged{suffix}"), read(tmp_path / f"whole{suffix}")
        )

        # A page of another feature layout stops the export; nothing is left behind.
        def wider(event: LoggedEvent) -> LoggedEvent:
            extra = np.zeros((len(event.features), 1))
            return replace(
                event, features=np.hstack([event.features, extra]), feature_version="wider"
            )

        def second_page_wider(self: SQLiteStore, *_: object) -> Iterator[list[LoggedEvent]]:
            for i, page in enumerate(pages(self, page_size=3)):
                yield [wider(e) for e in page] if i == 1 else page

        monkeypatch.setattr(SQLiteStore, "logged_event_pages", second_page_wider)
        with pytest.raises(ValueError, match="feature layouts"):
            export_log(store, tmp_path / f"broken{suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"paged{suffix}", f"whole{suffix}"]
