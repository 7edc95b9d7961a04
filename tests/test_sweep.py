"""The tuning job: search space, trials, and the full sweep on a real decision log.

The end-to-end test runs the real thing: the service (in process) serves a deliberately
poor policy and writes its decisions to SQLite, Ray Tune sweeps on that log, every trial is
an MLflow run, and the winner is registered, loaded back and promoted.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import mlflow
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from tipgraph.features import FEATURE_SPEC
from tipgraph.policies import make_policy
from tipgraph.registry import CHALLENGER, CHAMPION, PolicyRegistry
from tipgraph.settings import (
    BaselineSettings,
    EpsilonGreedySettings,
    LinearModelSettings,
    TipgraphSettings,
)
from tipgraph.simulator import run_local
from tipgraph.store import open_store
from tuning.config import (
    EvaluationSettings,
    LogSource,
    SearchSpace,
    TuningSettings,
    load_tuning_settings,
)
from tuning.data import TrainingLog
from tuning.ope import progressive
from tuning.report_render import PLOTS
from tuning.simulated_log import simulate_log
from tuning.sweep import (
    REPORT_ARTIFACT_DIR,
    SweepError,
    TrialProgress,
    attach_report,
    print_line,
    run_sweep,
)
from tuning.training_log import read_training_log
from tuning.trials import (
    KIND_PARAMETERS,
    evaluate,
    feature_label,
    param_space,
    policy_settings,
    trial_params,
)

REPO = Path(__file__).resolve().parents[1]
REPORT_ARTIFACTS = sorted(
    f"{REPORT_ARTIFACT_DIR}/{name}"
    for name in [plot.filename for plot in PLOTS] + ["report.html", "report.json"]
)
POOR_DEFAULT = BaselineSettings(name="baseline", epsilon=0.3)
"""Serves the generator's first candidate 70% of the time, whatever the user does."""


def sampled(kind: str, **extra: object) -> dict[str, object]:
    return {
        "kind": kind,
        "features": "all",
        "ridge": 2.0,
        "epsilon": 0.05,
        "alpha": 0.7,
        "v": 0.2,
        "temperature": 0.3,
        "gamma": 50.0,
        **extra,
    }


@pytest.mark.parametrize("kind", sorted(KIND_PARAMETERS))
def test_a_trial_builds_its_kind_from_its_own_parameters_only(kind: str) -> None:
    settings = policy_settings(sampled(kind, features="kind+time"))
    assert settings.kind == kind
    for name in ("alpha", "v", "temperature", "gamma", "ridge", "epsilon"):
        if name in KIND_PARAMETERS[kind]:
            assert getattr(settings, name) == sampled(kind)[name]
        else:  # another kind's hyperparameter is not even held
            assert name not in type(settings).model_fields
    assert set(trial_params(settings)) - {"kind", "features", "ts_draws", "half_life_s"} == set(
        KIND_PARAMETERS[kind]
    )
    if kind in ("uniform", "baseline"):
        assert "features" not in type(settings).model_fields
    else:
        assert isinstance(settings, LinearModelSettings)
        assert settings.features == ("kind", "time")


def test_half_lives_travel_as_numbers_with_0_for_none_and_are_recorded() -> None:
    assert policy_settings(sampled("linucb", half_life_s=0.0)).half_life_s is None
    forgetting = policy_settings(sampled("lints", half_life_s=86_400.0))
    assert forgetting.half_life_s == 86_400.0
    assert trial_params(forgetting)["half_life_s"] == "86400"
    assert trial_params(policy_settings(sampled("linucb")))["half_life_s"] == "none"
    assert "half_life_s" not in trial_params(policy_settings(sampled("uniform")))
    with pytest.raises(ValueError, match="half_lives_s must be > 0 or null"):
        SearchSpace(half_lives_s=(None, 0.0))


def test_a_forgetting_policy_is_evaluated_progressively_at_the_logs_times() -> None:
    log, _ = simulate_log(EpsilonGreedySettings(name="log", epsilon=0.2), n_events=300, seed=1)
    settings = policy_settings(sampled("linucb", half_life_s=3600.0))
    policy = make_policy(settings, log.dim, spec_version="s")
    estimate = progressive(policy, log)
    assert policy.n_updates == 300 and math.isfinite(estimate.value)
    # The decisions are 7.2 minutes apart: a one-hour half-life forgets most of the log.
    assert policy.stats_.latest_ == log.seconds()[-1]
    keeping = make_policy(policy_settings(sampled("linucb")), log.dim, spec_version="s")
    progressive(keeping, log)
    assert float(np.trace(policy.stats_.gram_)) < 0.5 * float(np.trace(keeping.stats_.gram_))


def test_feature_subsets_travel_as_labels_and_come_back() -> None:
    for subset in (None, ("history", "kind"), ("task",)):
        label = feature_label(subset)
        assert policy_settings(sampled("linucb", features=label)).features == subset


def test_the_space_samples_every_configured_kind_and_subset() -> None:
    space = SearchSpace(kinds=("linucb", "squarecb"), feature_subsets=(None, ("kind", "task")))
    tune_space = param_space(space)
    assert tune_space["kind"].categories == ["linucb", "squarecb"]
    assert tune_space["features"].categories == ["all", "kind+task"]
    assert {"ridge", "epsilon", "alpha", "v", "temperature", "gamma"} <= set(tune_space)


def test_settings_refuse_what_cannot_run() -> None:
    with pytest.raises(ValidationError, match=r"needs log\.path"):
        LogSource(source="file")
    with pytest.raises(ValidationError, match="exceeds high"):
        TuningSettings(space={"alpha": {"low": 2.0, "high": 1.0}})
    with pytest.raises(ValidationError, match="log-scale range needs low > 0"):
        TuningSettings(space={"ridge": {"low": 0.0, "high": 1.0, "log": True}})
    with pytest.raises(ValidationError, match="extra"):
        TuningSettings(num_sample=3)


def test_the_shipped_tuning_config_loads() -> None:
    tuning = load_tuning_settings(REPO / "configs" / "tuning.yaml")
    assert tuning.log.source == "store" and tuning.num_samples == 32
    for subset in tuning.space.feature_subsets:
        if subset is not None:
            assert FEATURE_SPEC.mask(subset).any()


def test_evaluate_replays_deterministically_and_leaves_the_policy_warm() -> None:
    log, _ = simulate_log(POOR_DEFAULT, n_events=300, seed=2)
    training = TrainingLog(log, FEATURE_SPEC.version, 0, "test")
    settings = policy_settings(sampled("squarecb"))
    first_policy, first = evaluate(settings, training, TuningSettings().evaluation)
    second_policy, second = evaluate(settings, training, TuningSettings().evaluation)
    assert first == second
    assert first_policy.n_updates == log.n_events
    X = log.event(0)[0]
    np.testing.assert_array_equal(first_policy.distribution(X), second_policy.distribution(X))


def test_an_imported_log_cannot_be_swept_over_tipgraph_feature_groups(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(
        "event_id,timestamp,action,chosen,pscore,reward,ctx_hour\n"
        "e1,2026-01-01T10:00:00Z,a,1,0.5,1,0.3\n"
        "e1,2026-01-01T10:00:00Z,b,0,0.5,,0.3\n",
        encoding="utf-8",
    )
    tuning = TuningSettings(
        log={"source": "file", "path": str(path)},
        space={"feature_subsets": [None, ["kind"]]},
    )
    training = read_training_log(tuning.log, TipgraphSettings())
    assert training.spec_version.startswith("import-") and training.log.n_events == 1
    with pytest.raises(SweepError, match="feature_subsets"):
        run_sweep(tuning, TipgraphSettings(), training=training)


@pytest.mark.e2e
def test_sweep_beats_a_poor_default_and_registers_a_model_that_loads_back(
    ray_cluster: None, tmp_path: Path
) -> None:
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{tmp_path}/decisions.db"},
        registry={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        policy=POOR_DEFAULT,
        shadows=[],
    )
    run_local(settings, users=20, decisions=2000, seed=3, block=2000)
    with open_store(settings.store) as store:
        last_reward_id = max(e.reward_id for e in store.logged_events())
    tuning = TuningSettings(
        log={"source": "store"},
        search="optuna",
        num_samples=8,
        seed=1,
        space={
            "kinds": ["linucb", "squarecb", "egreedy"],
            "feature_subsets": [None, ["kind", "time", "history"]],
        },
        storage_path=str(tmp_path / "tune"),
    )
    lines: list[str] = []
    result = run_sweep(tuning, settings, out=lines.append)

    # Progress was reported trial by trial, and every trial succeeded.
    assert sum(line.startswith("[") and "/8]" in line for line in lines) == 8
    assert len(result.trials) == 8 and all(t.estimate is not None for t in result.trials)
    # The sweep beat the poor default decisively: the promotion gate will pass.
    assert result.baseline_name == "served policy baseline (baseline)"
    assert result.winner.estimate is not None
    assert result.winner.estimate.lower > result.baseline.upper
    assert result.winner.estimate.lower == max(
        t.estimate.lower for t in result.trials if t.estimate is not None
    )

    # Every trial is an MLflow run under the sweep's run, with params and its estimate.
    registry = PolicyRegistry(settings.registry.tracking_uri)
    runs = registry.client.search_runs(
        [registry.experiment_id(tuning.experiment)],
        filter_string=f"tags.mlflow.parentRunId = '{result.sweep_run_id}'",
    )
    assert len(runs) == 8
    for run in runs:
        assert run.data.params["kind"] in ("linucb", "squarecb", "egreedy")
        assert run.data.metrics["lower"] <= run.data.metrics["value"] <= run.data.metrics["upper"]
        assert run.data.metrics["n_events"] == 2000

    # The registered challenger: the winner, warm on the log, with its evidence.
    # The report on the same log is attached to the sweep's run and the winner's.
    assert any(line.startswith("attached the report") for line in lines)
    for run_id in (result.sweep_run_id, result.winner.run_id):
        assert run_id is not None
        listed = registry.client.list_artifacts(run_id, REPORT_ARTIFACT_DIR)
        assert sorted(a.path for a in listed) == REPORT_ARTIFACTS
        assert all(a.file_size for a in listed)

    assert result.registered_version == registry.version_of(CHALLENGER) == "1"
    tags = registry.tags_of("1")
    assert tags["trained_through_reward_id"] == str(last_reward_id)
    assert float(tags["ope.lower"]) == pytest.approx(result.winner.estimate.lower)
    assert float(tags["baseline.value"]) == pytest.approx(result.baseline.value)
    record = registry.describe("1")
    assert record.baseline is not None and record.baseline.champion_version is None
    assert record.baseline.name == "served policy baseline (baseline)"
    assert record.lineage is not None and record.lineage.n_events == 2000
    assert record.lineage.sweep_run_id == result.sweep_run_id
    assert record.hyperparameters == trial_params(result.winner.settings)
    loaded = registry.load("@challenger", expected_spec_version=FEATURE_SPEC.version)
    assert loaded.policy.settings == result.winner.settings
    assert loaded.policy.n_updates == 2000
    log = read_training_log(tuning.log, settings).log
    mlflow.set_registry_uri(settings.registry.tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{registry.model_name}@{CHALLENGER}")
    for i in (0, 999, 1999):
        X = log.event(i)[0]
        expected = result.winner_policy.distribution(X)
        np.testing.assert_array_equal(loaded.policy.distribution(X), expected)
        np.testing.assert_array_equal(pyfunc.predict(X), expected)

    # The first promotion is gated too, against the served policy the sweep replayed.
    assert registry.promote().startswith("challenger version 1 lower bound "), (
        "the winner beat the poor default's upper bound, so its estimate too"
    )
    assert registry.version_of(CHAMPION) == "1"


def _run_sweep_process(module_args: list[str], env: dict[str, str]) -> CompletedProcess[str]:
    """``python -m <module_args>`` from the repository, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", *module_args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_python_m_tuning_sweep_runs_from_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "tuning.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tipgraph_config": str(REPO / "configs" / "tipgraph.yaml"),
                "log": {"source": "simulator", "events": 300, "seed": 4},
                "search": "random",
                "num_samples": 2,
                "num_cpus": 2,
                "register": True,
                "storage_path": str(tmp_path / "tune"),
                "space": {"kinds": ["egreedy"]},
            }
        ),
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "TIPGRAPH_REGISTRY__TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    done = _run_sweep_process(["tuning.sweep", "--config", str(config), "--no-register"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[  2/2] egreedy" in done.stdout
    assert "winner: trial" in done.stdout and "registered" not in done.stdout
    # A simulated log has no shadows or prompts to plot: the report is skipped, saying why.
    assert "report: not attached (the log comes from 'simulator'" in done.stdout
    assert "trials:" not in done.stderr  # no progress bar: stderr is not a terminal
    assert PolicyRegistry(env["TIPGRAPH_REGISTRY__TRACKING_URI"]).version_of(CHALLENGER) is None


TUNE_LINES = ("tuning on ", "running ", "[", "winner: ", "registered ", "report: ", "done in ")
"""How every line `tipgraph tune` prints starts: its own, and nothing from Ray, Tune, Optuna or
MLflow (their boxes, INFO lines, warnings and progress bars were filtered at the source)."""


def test_tipgraph_tune_prints_only_its_own_lines(tmp_path: Path) -> None:
    config = tmp_path / "tuning.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "log": {"source": "simulator", "events": 300, "seed": 4},
                "search": "optuna",
                "num_samples": 2,
                "num_cpus": 2,
                "storage_path": str(tmp_path / "tune"),
                "space": {"kinds": ["uniform"]},
            }
        ),
        encoding="utf-8",
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "TIPGRAPH_")) and k != "RAY_ADDRESS"
    }
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path}/mlflow.db"
    done = _run_sweep_process(["tipgraph_ops.cli", "tune", "--config", str(config)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    foreign = [line for line in done.stdout.splitlines() if not line.startswith(TUNE_LINES)]
    assert foreign == [], done.stdout
    # A uniform challenger against the served linucb: registered, and told it will not pass.
    (registered,) = [line for line in done.stdout.splitlines() if line.startswith("registered")]
    assert "does not beat" in registered and "`tipgraph promote` will refuse it" in registered
    assert "served policy linucb (linucb)" in registered


def test_the_default_output_pickles_while_print_is_redirected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tune pickles the callbacks that hold the sweep's output. Ray Serve's driver replaces
    ``builtins.print`` with a redirecting one, and ``print`` then no longer pickles by
    reference: `tipgraph tune` failed so in a process that had served."""
    import builtins

    from ray import cloudpickle

    def redirected_print(*args: object, **kwargs: object) -> None: ...

    held = builtins.print  # what the sweep's callbacks held before: bound at import time
    monkeypatch.setattr(builtins, "print", redirected_print)
    if type(held).__name__ == "builtin_function_or_method":  # not replaced by an earlier test
        with pytest.raises(Exception, match=r"not the same object as builtins\.print"):
            cloudpickle.dumps(held)
    for out in (print_line, TrialProgress(2, enabled=False).printer(print_line)):
        assert cloudpickle.loads(cloudpickle.dumps(out)) is print_line


def test_a_bad_tuning_config_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "tuning.yaml"
    config.write_text("num_samples: 0\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "tipgraph_ops.cli", "tune", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "num_samples" in done.stderr and "Traceback" not in done.stderr


def test_the_evaluation_estimator_is_checked_where_it_is_configured() -> None:
    for name in ("dr", "snips", "switch-dr", "dros", "sndr", "narrowest"):
        assert EvaluationSettings(estimator=name).estimator == name  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"evaluation\.clip applies to estimator dr, not sndr"):
        EvaluationSettings(estimator="sndr", clip=10.0)
    with pytest.raises(ValueError, match="too noisy to rank"):
        EvaluationSettings(estimator="ips")
    with pytest.raises(ValueError, match="estimator"):
        EvaluationSettings(estimator="slope")  # type: ignore[arg-type]


def test_the_report_on_the_decision_log_is_attached_to_mlflow_runs(tmp_path: Path) -> None:
    settings = TipgraphSettings(
        store={"url": f"sqlite:///{tmp_path}/decisions.db"},
        registry={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        shadows=[{"policy": {"name": "uniform", "kind": "uniform"}}],
    )
    run_local(settings, users=5, decisions=60, seed=2, block=60)
    registry = PolicyRegistry(settings.registry.tracking_uri)
    experiment = registry.experiment_id("report-test")
    runs = [registry.client.create_run(experiment).info.run_id for _ in range(2)]
    paths = attach_report(
        registry.client, runs, settings.store, LogSource(), EvaluationSettings(), settings
    )
    assert sorted(paths) == REPORT_ARTIFACTS
    for run_id in runs:
        listed = registry.client.list_artifacts(run_id, REPORT_ARTIFACT_DIR)
        assert sorted(a.path for a in listed) == REPORT_ARTIFACTS
    page = Path(
        mlflow.artifacts.download_artifacts(
            run_id=runs[0],
            artifact_path=f"{REPORT_ARTIFACT_DIR}/report.html",
            dst_path=str(tmp_path / "download"),
            tracking_uri=settings.registry.tracking_uri,
        )
    ).read_text(encoding="utf-8")
    assert "<td>linucb</td>" in page and "<td>uniform</td>" in page

    with pytest.raises(ValueError, match="no logged decisions with rewards"):
        attach_report(
            registry.client,
            runs,
            settings.store,
            LogSource(prompt_version="nope"),
            EvaluationSettings(),
            settings,
        )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_trial_progress_shows_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    quiet = TrialProgress(3, enabled=True)  # pytest's stderr is no terminal
    assert not quiet.active and quiet.printer(print) is print
    quiet.close()
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert not TrialProgress(3, enabled=False).active  # --no-progress
    bar = TrialProgress(3, enabled=True)
    assert bar.active
    write = bar.printer(print)
    for lower in (0.25, None, 0.5):
        write(f"trial {lower}")
        bar.trial_done(lower)
    bar.close()
    assert (bar.done, bar.failed, bar.best) == (3, 1, 0.5)
    shown = terminal.getvalue()  # tqdm redraws at most every 0.1 s: some states only
    assert "/3 [" in shown and "trials/s" in shown and "best lower 0." in shown
    assert capsys.readouterr().out.splitlines() == ["trial 0.25", "trial None", "trial 0.5"]
