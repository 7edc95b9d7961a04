from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tipgraph.serve_config import render_serve_config, render_serve_config_text
from tipgraph.settings import TipgraphSettings, load_settings, resolve_paths
from tipgraph_ops.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tipgraph.yaml"


def test_committed_serve_config_matches_the_settings() -> None:
    expected = render_serve_config_text(load_settings(CONFIG), "configs/tipgraph.yaml")
    actual = (ROOT / "serve_config.yaml").read_text(encoding="utf-8")
    assert actual == expected, "serve_config.yaml drifted: run `make render-serve-config`"


def test_check_command_detects_drift(tmp_path: Path) -> None:
    stale = tmp_path / "serve_config.yaml"
    stale.write_text("applications: []\n")
    assert (
        main(["--config", str(CONFIG), "render-serve-config", "--out", str(stale), "--check"]) == 3
    )
    assert main(["--config", str(CONFIG), "render-serve-config", "--out", str(stale)]) == 0
    assert (
        main(["--config", str(CONFIG), "render-serve-config", "--out", str(stale), "--check"]) == 0
    )


def test_every_stage_has_its_own_autoscaling_and_fractional_cpus() -> None:
    settings = load_settings(CONFIG)
    app = render_serve_config(settings, "configs/tipgraph.yaml")["applications"][0]
    names = [d["name"] for d in app["deployments"]]
    assert names == ["ingress", "context", "generation", "scoring", "shadows"]
    shadows = app["deployments"][-1]["user_config"]["policies"]
    assert [p["name"] for p in shadows] == [s.policy.name for s in settings.shadows] != []
    total_max_cpus = 0.0
    for deployment in app["deployments"]:
        assert 0 < deployment["ray_actor_options"]["num_cpus"] < 1
        assert deployment["autoscaling_config"]["max_replicas"] >= 1
        total_max_cpus += (
            deployment["ray_actor_options"]["num_cpus"]
            * deployment["autoscaling_config"]["max_replicas"]
        )
    assert total_max_cpus <= 2.0, "every stage at max replicas must fit on the 2-core machine"


def test_env_overrides_yaml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIPGRAPH_STORE__URL", "postgresql://u@h:5432/d")
    monkeypatch.setenv("TIPGRAPH_REWARDS__SNOOZE", "0.5")
    settings = load_settings(CONFIG)
    assert settings.store.url == "postgresql://u@h:5432/d"
    assert settings.store.batch_size == 256  # untouched YAML value survives the merge
    assert settings.rewards.reward_for("snooze") == 0.5


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"store": {"url": "mysql://x"}}, "must start with sqlite:// or postgresql://"),
        ({"rewards": {"done": 2.0}}, "outside"),
        ({"policy": {"name": "x", "kind": "magic"}}, "linucb"),
        ({"polcy": {}}, "Extra inputs are not permitted"),
        ({"deployments": {"ingress": {}}}, "missing"),
        ({"shadows": [{"policy": {"name": "linucb", "kind": "uniform"}}]}, "unique"),
        (
            {
                "deployments": {
                    **{stage: {} for stage in ("ingress", "context", "generation", "scoring")},
                    "shadows": {"autoscaling": {"signal": "items"}},
                }
            },
            r"signal 'items' of \['shadows'\]: only \['context', 'generation', 'pool'\]",
        ),
        (
            {"shadows": [{"policy": {"name": "u", "kind": "uniform"}, "deployment": {}}]},
            "every shadow runs in one deployment, set in deployments.shadows",
        ),
    ],
)
def test_bad_config_fails_loudly(data: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        TipgraphSettings(**data)


def test_secret_is_masked_in_dumps() -> None:
    dumped = str(TipgraphSettings().masked_dump())
    assert "tipgraph-dev-only-secret" not in dumped


def test_relative_sqlite_path_is_made_absolute(tmp_path: Path) -> None:
    settings = TipgraphSettings(store={"url": "sqlite:///var/x.db"})
    assert resolve_paths(settings, tmp_path).store.url == f"sqlite:///{tmp_path}/var/x.db"
    memory = TipgraphSettings(store={"url": "sqlite:///:memory:"})
    assert resolve_paths(memory, tmp_path).store.url == "sqlite:///:memory:"


def test_serve_refuses_to_start_without_an_api_token_or_with_a_missing_token_file(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tipgraph_ops.cli import EXIT_USAGE, main

    monkeypatch.delenv("TIPGRAPH_API_TOKEN", raising=False)
    assert main(["serve"]) == EXIT_USAGE
    assert "no API token: set auth.tokens_file" in capsys.readouterr().err
    monkeypatch.setenv("TIPGRAPH_AUTH__TOKENS_FILE", "/nonexistent/tokens.yaml")
    assert main(["serve"]) == EXIT_USAGE
    assert "/nonexistent/tokens.yaml: No such file" in capsys.readouterr().err


def test_the_api_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tipgraph.settings import TipgraphSettings

    monkeypatch.setenv("TIPGRAPH_API_TOKEN", "from-env")
    token = TipgraphSettings().auth.api_token
    assert token is not None and token.get_secret_value() == "from-env"
    assert "from-env" not in repr(TipgraphSettings())  # never printed by accident
    monkeypatch.delenv("TIPGRAPH_API_TOKEN")
    assert TipgraphSettings().auth.api_token is None


def test_serve_refuses_to_start_without_a_user_key_secret(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tipgraph_ops.cli import EXIT_USAGE, main

    monkeypatch.delenv("TIPGRAPH_PRIVACY__USER_KEY_SECRET", raising=False)
    monkeypatch.delenv("TIPGRAPH_PRIVACY__ALLOW_DEV_SECRET", raising=False)
    assert main(["serve"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "privacy.user_key_secret is not set" in err
    assert "TIPGRAPH_PRIVACY__USER_KEY_SECRET" in err and "Traceback" not in err


def test_a_short_user_key_secret_is_refused_and_the_dev_key_needs_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    from tipgraph.settings import DEV_USER_KEY_SECRET, MissingUserKeySecret, TipgraphSettings

    monkeypatch.delenv("TIPGRAPH_PRIVACY__USER_KEY_SECRET")  # the environment wins
    with pytest.raises(ValidationError, match="it needs at least 32"):
        TipgraphSettings(privacy={"user_key_secret": "too-short"})
    unset = TipgraphSettings()
    with pytest.raises(MissingUserKeySecret, match="not set"):
        unset.privacy.current_secret()
    with pytest.raises(MissingUserKeySecret):
        unset.privacy.user_key_secrets()
    dev = TipgraphSettings(privacy={"allow_dev_secret": True})
    assert dev.privacy.uses_dev_secret and dev.privacy.current_secret() == DEV_USER_KEY_SECRET
    # A real key wins over the flag.
    real = TipgraphSettings(privacy={"allow_dev_secret": True, "user_key_secret": "x" * 32})
    assert not real.privacy.uses_dev_secret and real.privacy.current_secret() == "x" * 32


def test_nothing_that_pseudonymises_starts_without_the_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tipgraph.settings import MissingUserKeySecret, TipgraphSettings
    from tipgraph.wiring import tip_service

    monkeypatch.delenv("TIPGRAPH_PRIVACY__USER_KEY_SECRET")
    settings = TipgraphSettings(store={"url": f"sqlite:///{tmp_path / 'x.db'}"})
    with pytest.raises(MissingUserKeySecret):
        tip_service(settings, lambda *wired: None, owner="test")  # type: ignore[arg-type,return-value]
