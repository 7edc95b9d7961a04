"""The tuning job: a Ray Tune sweep over policy kinds and hyperparameters, scored off-policy.

Every trial replays one policy configuration over the logged events in time order
(:func:`tuning.ope.progressive`): the policy's probability for each logged action is taken
before it learns from that event, so the estimate is what the configuration would have
earned had it been serving while the log was collected.  The metric the search maximises is
the estimate's 95% *lower* bound, so a configuration that looks good only by luck on a few
heavily weighted events does not win.

The winner is replayed once more in the driver, which leaves it warm-started on the whole
log, and registered as ``tip-policy@challenger`` together with the estimate of the current
champion (or, before there is one, of the served policy) on the same log, so that
``tipgraph promote`` can judge it.  Every trial is an MLflow run nested under the sweep's run.
When the log is the decision log, the plots of ``tipgraph report`` on it are attached to the
sweep's run and the winner's, under ``report/``.

Run it as ``tipgraph tune --config configs/tuning.yaml`` or ``python -m tuning.sweep``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from tipgraph.features import FEATURE_SPEC
from tipgraph.policies import Policy, PolicyStateError
from tipgraph.progress import progress_bar
from tipgraph.registry import (
    CHAMPION,
    Baseline,
    Lineage,
    OffPolicyEvidence,
    PolicyRegistry,
    RegistryError,
)
from tipgraph.settings import (
    PolicySettings,
    StoreSettings,
    TipgraphSettings,
    load_settings,
    resolve_paths,
)
from tuning.config import (
    DEFAULT_TUNING_CONFIG,
    EvaluationSettings,
    LogSource,
    TuningSettings,
    load_tuning_settings,
)
from tuning.data import TrainingLog
from tuning.ope import Estimate
from tuning.report import configured_policies, render_from_store
from tuning.training_log import log_store_settings, read_training_log
from tuning.trials import (
    METRIC,
    describe,
    evaluate,
    param_space,
    policy_settings,
    run_trial,
    trial_params,
)

logger = logging.getLogger(__name__)

REPORT_ARTIFACT_DIR = "report"


class SweepError(RuntimeError):
    """A sweep that cannot run or produced no usable trial."""


# -- the sweep ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialOutcome:
    number: int
    settings: PolicySettings
    estimate: Estimate | None
    error: str | None
    run_id: str | None


@dataclass(frozen=True)
class SweepResult:
    sweep_run_id: str
    sweep_run_name: str
    experiment: str
    trials: list[TrialOutcome]
    winner: TrialOutcome
    winner_policy: Policy
    baseline_name: str
    baseline: Estimate
    registered_version: str | None
    wall_s: float


class MlflowTrialLogger:
    """Logs every finished trial as an MLflow run nested under the sweep's, and prints it."""

    def __init__(
        self,
        registry: PolicyRegistry,
        experiment_id: str,
        parent_run_id: str,
        ts_draws: int,
        total: int,
        out: Callable[[str], None],
    ) -> None:
        self.registry = registry
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.ts_draws = ts_draws
        self.total = total
        self.out = out
        self.outcomes: list[TrialOutcome] = []

    def record(
        self, config: Mapping[str, Any], metrics: Mapping[str, Any] | None, error: str | None
    ) -> None:
        from mlflow.entities import Metric, Param  # heavy: as PolicyRegistry imports MLflow

        settings = policy_settings(config, ts_draws=self.ts_draws)
        number = len(self.outcomes) + 1
        client = self.registry.client
        run = client.create_run(
            self.experiment_id,
            run_name=f"trial-{number:03d}-{settings.kind}",
            tags={"mlflow.parentRunId": self.parent_run_id, "tipgraph.role": "trial"},
        )
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        estimate = None
        logged = [Param(k, v) for k, v in trial_params(settings).items()]
        if metrics is not None and error is None:
            estimate = Estimate(
                value=float(metrics["value"]),
                lower=float(metrics["lower"]),
                upper=float(metrics["upper"]),
                n_events=int(metrics["n_events"]),
                name="progressive",
            )
            values = {
                k: float(metrics[k])
                for k in ("value", "lower", "upper", "n_events", "replay_s", "events_per_s")
            }
            client.log_batch(
                run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()], params=logged
            )
            client.set_terminated(run_id, "FINISHED")
            line = (
                f"{settings.kind:<8} {estimate.value:.4f} "
                f"[{estimate.lower:.4f}, {estimate.upper:.4f}]  {describe(settings)}"
            )
        else:
            client.log_batch(run_id, params=logged)
            client.set_tag(run_id, "error", (error or "no result")[:500])
            client.set_terminated(run_id, "FAILED")
            line = f"{settings.kind:<8} FAILED: {(error or 'no result').splitlines()[-1]}"
        self.outcomes.append(TrialOutcome(number, settings, estimate, error, run_id))
        self.out(f"[{number:>3}/{self.total}] {line}")


def _tune_callback(logger_: MlflowTrialLogger) -> Any:
    from ray.tune import Callback  # heavy: Ray Tune loads only in the processes that sweep

    class _Forward(Callback):
        # Runs in the driver as each trial ends, so progress and MLflow runs appear live.
        def on_trial_complete(
            self, iteration: int, trials: list[Any], trial: Any, **_: Any
        ) -> None:
            logger_.record(trial.config, trial.last_result, None)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **_: Any) -> None:
            logger_.record(trial.config, None, _error_text(trial))

    return _Forward()


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return Path(path).read_text(encoding="utf-8", errors="replace").strip() or "trial failed"
    return "trial failed"


class TrialProgress:
    """A progress bar over the sweep's trials on stderr, with the best lower bound so far.

    Off when ``enabled`` is False (``--no-progress``) or stderr is not a terminal (CI logs,
    pipes), where a bar is only noise; the per-trial lines are printed either way.
    """

    def __init__(self, total: int, *, enabled: bool) -> None:
        self._bar = progress_bar(total, "trials", enabled=enabled)
        self.done = 0
        self.failed = 0
        self.best: float | None = None

    @property
    def active(self) -> bool:
        return not self._bar.disable

    def trial_done(self, lower: float | None) -> None:
        """One more trial ended; ``lower`` is its metric, None if it failed."""
        self.done += 1
        if lower is None:
            self.failed += 1
        elif self.best is None or lower > self.best:
            self.best = lower
        best = "—" if self.best is None else f"{self.best:.4f}"
        self._bar.set_postfix_str(f"best lower {best}, failed {self.failed}", refresh=False)
        self._bar.update(1)

    def printer(self, out: Callable[[str], None]) -> Callable[[str], None]:
        """``out``, lifting the bar while it prints so that no line lands inside the bar."""
        if not self.active:
            return out

        def write(line: str) -> None:
            with self._bar.external_write_mode(file=sys.stdout):
                out(line)

        return write

    def close(self) -> None:
        self._bar.close()


def _progress_callback(progress: TrialProgress) -> Any:
    from ray.tune import Callback  # heavy: Ray Tune loads only in the processes that sweep

    class _Progress(Callback):
        # Runs in the driver after _Forward has printed the trial's line.
        def on_trial_complete(
            self, iteration: int, trials: list[Any], trial: Any, **_: Any
        ) -> None:
            result = trial.last_result or {}
            lower = result.get(METRIC)
            progress.trial_done(None if lower is None else float(lower))

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **_: Any) -> None:
            progress.trial_done(None)

    return _Progress()


def attach_report(
    client: Any,
    run_ids: Sequence[str],
    store_settings: StoreSettings,
    log: LogSource,
    evaluation: EvaluationSettings,
    settings: TipgraphSettings,
) -> list[str]:
    """Render ``tipgraph report`` on the decisions ``log`` selects from the decision log and
    log its files under ``report/`` of every MLflow run in ``run_ids``; the artifact paths.

    ``client`` is an ``mlflow.MlflowClient``.  Raises what rendering raises (ValueError for
    an empty window, StoreError).
    """

    log_filter = log.log_filter()
    with tempfile.TemporaryDirectory(prefix="tipgraph-report-") as tmp:
        _, files = render_from_store(
            store_settings,
            Path(tmp),
            log_filter=log_filter,
            evaluation=evaluation,
            expected=configured_policies(settings),
        )
        for run_id in run_ids:
            client.log_artifacts(run_id, tmp, artifact_path=REPORT_ARTIFACT_DIR)
    return [f"{REPORT_ARTIFACT_DIR}/{path.name}" for path in files]


def _report_to_mlflow(
    client: Any,
    run_ids: Sequence[str],
    tuning: TuningSettings,
    settings: TipgraphSettings,
    *,
    log_read_here: bool,
    out: Callable[[str], None],
) -> None:
    """Attach the report to the runs when the sweep read the decision log itself.

    A file or simulated log has no shadow runs, generation sources or prompt versions to
    plot, and a log the caller passed in may not be the store's: both are skipped, with
    the reason in a tag and the output.  A finished sweep never fails on its report.
    """
    if tuning.log.source != "store" or not log_read_here:
        reason = (
            f"the log comes from {tuning.log.source!r}, not the decision log"
            if tuning.log.source != "store"
            else "the log was passed in, not read from the decision log"
        )
        client.set_tag(run_ids[0], "report", f"skipped: {reason}")
        out(f"report: not attached ({reason}; `tipgraph report` plots the decision log)")
        return
    try:
        paths = attach_report(
            client,
            run_ids,
            log_store_settings(tuning.log, settings),
            tuning.log,
            tuning.evaluation,
            settings,
        )
    except Exception as err:  # the winner is registered already; a plot must not undo that
        logger.warning("report: not attached to the MLflow runs: %s", err, exc_info=True)
        client.set_tag(run_ids[0], "report", f"failed: {str(err)[:400]}")
        out(f"report: not attached ({err})")
        return
    client.set_tag(run_ids[0], "report", REPORT_ARTIFACT_DIR)
    out(
        f"attached the report ({len(paths)} files) under {REPORT_ARTIFACT_DIR}/ of the sweep's "
        "and the winner's MLflow runs"
    )


@dataclass(frozen=True)
class _BaselineChoice:
    name: str
    settings: PolicySettings
    champion_version: str | None
    """The champion when the sweep ran, whether or not it was comparable."""


def _baseline(
    registry: PolicyRegistry, settings: TipgraphSettings, training: TrainingLog
) -> _BaselineChoice:
    """What the winner must beat: the champion's configuration, else the served policy's."""

    champion_version = registry.version_of(CHAMPION)
    if champion_version is not None:
        try:
            champion = registry.load(champion_version, expected_spec_version=training.spec_version)
        except (PolicyStateError, RegistryError) as err:
            logger.warning("champion not comparable on this log (%s); using the served policy", err)
        else:
            return _BaselineChoice(
                f"champion {champion.ref} ({champion.policy.kind})",
                champion.policy.settings,
                champion_version,
            )
    served = settings.policy
    return _BaselineChoice(f"served policy {served.name} ({served.kind})", served, champion_version)


def _evidence(estimate: Estimate, estimator: str) -> OffPolicyEvidence:
    return OffPolicyEvidence(
        estimator=f"progressive {estimator}",
        value=estimate.value,
        lower=estimate.lower,
        upper=estimate.upper,
        n_events=estimate.n_events,
    )


def _lineage(training: TrainingLog, log: LogSource, sweep_run_id: str) -> Lineage:
    filters = {k: v for k, v in log.log_filter().describe().items() if v is not None}
    return Lineage(
        source=training.source,
        n_events=training.log.n_events,
        trained_through_reward_id=training.trained_through_reward_id,
        filters=filters if log.source != "simulator" else {},
        sweep_run_id=sweep_run_id,
    )


def _register_winner(
    registry: PolicyRegistry,
    policy: Policy,
    evidence: OffPolicyEvidence,
    baseline: Baseline,
    training: TrainingLog,
    tuning: TuningSettings,
    sweep_run_id: str,
    winner: TrialOutcome,
) -> str:
    return registry.register(
        policy,
        evidence,
        baseline=baseline,
        lineage=_lineage(training, tuning.log, sweep_run_id),
        hyperparameters=trial_params(policy.settings),
        run_id=winner.run_id,
    )


def _gate_outlook(
    model_name: str, version: str, evidence: OffPolicyEvidence, baseline: Baseline
) -> str:
    """Says what ``tipgraph promote`` will do with the version just registered."""
    passes = evidence.beats(baseline.evidence)
    return (
        f"registered {model_name} version {version} as @challenger: its lower bound "
        f"{evidence.lower:.4f} {'beats' if passes else 'does not beat'} "
        f"{baseline.evidence.value:.4f}, the estimate of {baseline.name} on the same log, so "
        + (
            "`tipgraph promote` will move @champion to it"
            if passes
            else "`tipgraph promote` will refuse it"
        )
    )


def print_line(line: str) -> None:
    """The sweep's default output. A named function, not ``print`` itself: Tune pickles the
    callbacks that hold it, and ``builtins.print`` cannot be pickled by reference once Ray
    Serve's driver has replaced it with a redirecting print (as in a process serving too)."""
    print(line, flush=True)


def run_sweep(
    tuning: TuningSettings,
    settings: TipgraphSettings | None = None,
    *,
    training: TrainingLog | None = None,
    out: Callable[[str], None] | None = None,
    progress: bool = True,
) -> SweepResult:
    """Load the log, sweep, log every trial to MLflow, register the winner as challenger.

    ``progress`` allows the trials' progress bar (shown only when stderr is a terminal).
    ``out`` receives every line the sweep reports (default: stdout).
    """
    out = out or print_line
    started = time.perf_counter()
    if settings is None:
        settings = resolve_paths(
            load_settings(tuning.tipgraph_config, tuning.tipgraph_overlays), Path.cwd()
        )
    log_read_here = training is None
    if training is None:
        training = read_training_log(tuning.log, settings)
    _check_log(training, tuning, out)
    registry = PolicyRegistry(
        settings.registry.tracking_uri, model_name=settings.registry.model_name
    )
    sweep = _start_sweep_run(registry, tuning, training)
    bar = TrialProgress(tuning.num_samples, enabled=progress)
    trial_logger = MlflowTrialLogger(
        registry,
        sweep.experiment_id,
        sweep.run_id,
        tuning.space.ts_draws,
        tuning.num_samples,
        bar.printer(out),
    )
    fit_started = time.perf_counter()
    _run_trials(tuning, training, sweep, trial_logger, bar, out)
    fit_s = time.perf_counter() - fit_started

    result = _conclude(registry, settings, tuning, training, sweep, trial_logger.outcomes, out)
    _report_to_mlflow(
        registry.client,
        [sweep.run_id] + ([result.winner.run_id] if result.winner.run_id else []),
        tuning,
        settings,
        log_read_here=log_read_here,
        out=out,
    )
    registry.client.set_terminated(sweep.run_id, "FINISHED")
    wall_s = time.perf_counter() - started
    out(
        f"done in {wall_s:.1f} s: {fit_s:.1f} s in trials, {fit_started - started:.1f} s "
        f"before them (log, Ray, MLflow), {wall_s - fit_s - (fit_started - started):.1f} s "
        "after (winner and baseline replays, registration)"
    )
    return replace(result, wall_s=wall_s)


@dataclass(frozen=True)
class _SweepRun:
    """The sweep's MLflow run, parent of every trial's run."""

    experiment_id: str
    run_id: str
    name: str


def _check_log(training: TrainingLog, tuning: TuningSettings, out: Callable[[str], None]) -> None:
    log = training.log
    if training.spec_version != FEATURE_SPEC.version and tuning.space.feature_subsets != (None,):
        raise SweepError(
            f"space.feature_subsets name tipgraph's feature groups, but this log has its own "
            f"features ({training.spec_version}); set feature_subsets: [null]"
        )
    out(
        f"tuning on {log.n_events} events ({log.n_rows} candidates, d={log.dim}) from "
        f"{training.source}: {tuning.num_samples} trials, {tuning.search} search, metric = "
        f"lower 95% bound of progressive {tuning.evaluation.estimator}"
    )


def _start_sweep_run(
    registry: PolicyRegistry, tuning: TuningSettings, training: TrainingLog
) -> _SweepRun:
    experiment_id = registry.experiment_id(tuning.experiment)
    name = f"sweep-{datetime.now():%Y%m%d-%H%M%S}"
    run = registry.client.create_run(
        experiment_id,
        run_name=name,
        tags={
            "tipgraph.role": "sweep",
            "log.source": training.source,
            "log.n_events": str(training.log.n_events),
            "log.spec_version": training.spec_version,
            "log.trained_through_reward_id": str(training.trained_through_reward_id),
            "evaluation.estimator": tuning.evaluation.estimator,
            "search": tuning.search,
        },
    )
    return _SweepRun(experiment_id, run.info.run_id, name)


def _run_trials(
    tuning: TuningSettings,
    training: TrainingLog,
    sweep: _SweepRun,
    trial_logger: MlflowTrialLogger,
    bar: TrialProgress,
    out: Callable[[str], None],
) -> None:
    """Every trial through Ray Tune; each finished one is recorded by ``trial_logger``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune's "new output" prints a configuration box and TensorBoard hints even at verbose=0;
    # the classic reporter at verbose=0 prints nothing. Each trial has a line of ours instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Heavy (Ray, Tune, Optuna): loaded only by the processes that sweep.
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()  # a RayJob's entrypoint: join its cluster, which sizes itself
        else:
            # A private throwaway cluster: its start-up lines (and the notice that it made
            # itself an auth token) are Ray's business, not the operator's; errors still show.
            ray.init(
                num_cpus=tuning.num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
            )
    concurrency = tuning.max_concurrent_trials or max(1, int(ray.cluster_resources()["CPU"]))
    # Optuna logs "A new study created in memory" at INFO through a handler of its own.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search_alg: Any = (
        OptunaSearch(seed=tuning.seed)
        if tuning.search == "optuna"
        else BasicVariantGenerator(random_state=tuning.seed)
    )
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            training=training,
            evaluation=tuning.evaluation,
            ts_draws=tuning.space.ts_draws,
        ),
        {"cpu": 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(tuning.space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=tuning.num_samples,
            search_alg=search_alg,
            max_concurrent_trials=concurrency,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            storage_path=str(Path(tuning.storage_path).resolve()),
            callbacks=[_tune_callback(trial_logger), _progress_callback(bar)],
            verbose=0,
        ),
    )
    out(f"running {concurrency} trials at a time; MLflow run {sweep.name} ({sweep.run_id})")
    try:
        tuner.fit()
    finally:
        bar.close()


def _conclude(
    registry: PolicyRegistry,
    settings: TipgraphSettings,
    tuning: TuningSettings,
    training: TrainingLog,
    sweep: _SweepRun,
    outcomes: Sequence[TrialOutcome],
    out: Callable[[str], None],
) -> SweepResult:
    """Pick the winner, replay it and the baseline here, record both, register the winner."""
    finished = [t for t in outcomes if t.estimate is not None]
    if not finished:
        registry.client.set_terminated(sweep.run_id, "FAILED")
        raise SweepError(f"all {len(outcomes)} trials failed; see the MLflow runs")
    winner = max(finished, key=lambda t: t.estimate.lower if t.estimate else float("-inf"))

    # Replay the winner here: deterministic, and it leaves the policy warm on the whole log.
    policy, estimate = evaluate(winner.settings, training, tuning.evaluation)
    choice = _baseline(registry, settings, training)
    _, baseline = evaluate(choice.settings, training, tuning.evaluation)
    out(
        f"winner: trial {winner.number} {winner.settings.kind} {describe(winner.settings)}: "
        f"{estimate.value:.4f} [{estimate.lower:.4f}, {estimate.upper:.4f}]; "
        f"{choice.name}: {baseline.value:.4f} [{baseline.lower:.4f}, {baseline.upper:.4f}]"
    )
    client = registry.client
    for key, value in {
        "winner.value": estimate.value,
        "winner.lower": estimate.lower,
        "baseline.value": baseline.value,
        "baseline.lower": baseline.lower,
        "trials.failed": float(len(outcomes) - len(finished)),
    }.items():
        client.log_metric(sweep.run_id, key, value)
    client.set_tag(sweep.run_id, "winner.run_id", str(winner.run_id))
    client.set_tag(sweep.run_id, "baseline", choice.name)

    version = None
    if tuning.register_winner:
        estimator = tuning.evaluation.estimator
        evidence = _evidence(estimate, estimator)
        recorded = Baseline(choice.name, _evidence(baseline, estimator), choice.champion_version)
        version = _register_winner(
            registry, policy, evidence, recorded, training, tuning, sweep.run_id, winner
        )
        client.set_tag(sweep.run_id, "registered_version", version)
        out(_gate_outlook(registry.model_name, version, evidence, recorded))
    return SweepResult(
        sweep_run_id=sweep.run_id,
        sweep_run_name=sweep.name,
        experiment=tuning.experiment,
        trials=list(outcomes),
        winner=winner,
        winner_policy=policy,
        baseline_name=choice.name,
        baseline=baseline,
        registered_version=version,
        wall_s=0.0,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        dest="tuning_config",
        default=str(DEFAULT_TUNING_CONFIG),
        help="tuning YAML (default: configs/tuning.yaml)",
    )
    parser.add_argument("--num-samples", type=int, default=None, help="override num_samples")
    parser.add_argument(
        "--no-register", action="store_true", help="sweep and report, register nothing"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is only shown when stderr is a terminal anyway)",
    )


def run_from_args(args: argparse.Namespace, *, tipgraph_config: str | None = None) -> int:
    tuning = load_tuning_settings(args.tuning_config)
    overrides: dict[str, Any] = {}
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        overrides["num_samples"] = args.num_samples
    if args.no_register:
        overrides["register_winner"] = False
    if tipgraph_config is not None:
        overrides["tipgraph_config"] = tipgraph_config
    tuning = tuning.model_copy(update=overrides)
    try:
        run_sweep(tuning, progress=not args.no_progress)
    except SweepError as err:
        print(f"tune: error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.sweep", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run_from_args(args)
    except (OSError, ValueError) as err:
        print(f"tune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
