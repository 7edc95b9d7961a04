"""``tipgraph report --out DIR``: plots and numbers from the decision log.

Writes into DIR five PNGs (:data:`tuning.report_render.PLOTS`: estimated value per
policy, reward over time, shadow agreement, value per prompt version, fallback rate), one
self-contained ``report.html`` with the same images inline, and ``report.json`` with the
numbers.  The value estimates use the estimator of the tuning config (``evaluation:`` in
configs/tuning.yaml), as ``tipgraph tune`` does; ``tune`` attaches the same files to its
MLflow runs under ``report/``.

Run it as ``tipgraph report --out reports/today`` or ``python -m tuning.report``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from tipgraph.features import FEATURE_SPEC
from tipgraph.settings import (
    PolicySettings,
    StoreSettings,
    TipgraphSettings,
    load_settings,
    resolve_paths,
)
from tipgraph.store import (
    EVERYTHING,
    DecisionStore,
    LogFilter,
    PolicyRole,
    StoreError,
    open_store,
)
from tuning.config import DEFAULT_TUNING_CONFIG, EvaluationSettings, load_tuning_settings
from tuning.data import from_events, on_layout
from tuning.export import parse_timestamp
from tuning.importance import feature_importance
from tuning.ope import EstimatorError
from tuning.report_data import BucketSpec, Report, build_report, make_estimator
from tuning.report_render import write_report

logger = logging.getLogger(__name__)


def configured_policies(settings: TipgraphSettings) -> dict[str, PolicyRole]:
    """The served policy and the shadows the config names: listed even if they logged
    nothing, so a shadow that never answered shows as "no data" rather than vanishing."""
    roles: dict[str, PolicyRole] = {settings.policy.name: "served"}
    roles.update({shadow.policy.name: "shadow" for shadow in settings.shadows})
    return roles


def load_report(
    store: DecisionStore,
    *,
    log_filter: LogFilter | None = None,
    evaluation: EvaluationSettings | None = None,
    bucket: BucketSpec | None = None,
    expected: Mapping[str, PolicyRole] | None = None,
    feature_version: str = FEATURE_SPEC.version,
    served: PolicySettings | None = None,
) -> Report:
    """The report on the decisions ``log_filter`` selects (default: all) that were made on
    ``feature_version``'s layout (the estimators' reward model needs one layout), valued
    with ``evaluation``'s estimator (default: the tuning config's defaults, DR).  With
    ``served`` (the configured served policy) it adds feature-group importance."""
    f = log_filter or EVERYTHING
    events = store.logged_events(f)
    runs = store.logged_policy_runs(f)
    kept = on_layout(events, feature_version)
    notes = []
    if len(kept) < len(events):
        notes.append(
            f"{len(events) - len(kept)} of {len(events)} decisions were made on other feature "
            f"layouts than {feature_version} and are left out."
        )
    evaluation = evaluation or EvaluationSettings()
    report = build_report(
        kept,
        runs,
        estimator=make_estimator(evaluation),
        bucket=bucket,
        expected=expected,
        filters=f.describe(),
        notes=notes,
    )
    if served is None:
        return report
    try:
        importance = feature_importance(served, from_events(kept), evaluation)
    except EstimatorError as err:
        report.notes.append(f"no feature-group importance: {err}")
        return report
    return replace(report, importance=importance)


def render_from_store(
    store_settings: StoreSettings,
    out: Path,
    *,
    log_filter: LogFilter | None = None,
    evaluation: EvaluationSettings | None = None,
    bucket: BucketSpec | None = None,
    expected: Mapping[str, PolicyRole] | None = None,
    served: PolicySettings | None = None,
) -> tuple[Report, list[Path]]:
    """Open the store, compute the report, write its files into ``out``."""
    with open_store(store_settings) as store:
        report = load_report(
            store,
            log_filter=log_filter,
            evaluation=evaluation,
            bucket=bucket,
            expected=expected,
            served=served,
        )
    return report, write_report(report, out)


def summary(report: Report) -> str:
    """One line: the window and each policy's estimate."""
    values = "; ".join(
        f"{p.name} ({p.role}) "
        + (
            "no data"
            if p.estimate is None
            else f"{p.estimate.value:.4f} [{p.estimate.lower:.4f}, {p.estimate.upper:.4f}]"
        )
        for p in report.policies
    )
    return (
        f"report on {report.n_events} decisions from {report.first_at:%Y-%m-%d %H:%M} to "
        f"{report.last_at:%Y-%m-%d %H:%M} UTC, {report.estimator}: {values}; fallback rate "
        f"{report.fallback.rate:.1%}"
    )


# -- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory for the PNGs, HTML and JSON")
    parser.add_argument("--since", default=None, help="ISO 8601 with offset, inclusive")
    parser.add_argument("--until", default=None, help="ISO 8601 with offset, exclusive")
    parser.add_argument("--prompt-version", default=None)
    parser.add_argument(
        "--policy", default=None, help="only decisions served by this policy (as export)"
    )
    parser.add_argument(
        "--bucket",
        default="auto",
        help="time bucket of the over-time plots: auto (the window in 20 parts), a duration "
        "(30m, 1h, 1d, 1w) or a number of decisions (500); default auto",
    )
    parser.add_argument(
        "--tuning-config",
        default=None,
        help="tuning YAML whose evaluation: settings pick the estimator "
        f"(default: {DEFAULT_TUNING_CONFIG} if it exists, else DR)",
    )


def _evaluation(path: str | None) -> EvaluationSettings:
    if path is None:
        if not DEFAULT_TUNING_CONFIG.exists():
            logger.info("no %s here: the report uses the default estimator", DEFAULT_TUNING_CONFIG)
            return EvaluationSettings()
        path = str(DEFAULT_TUNING_CONFIG)
    return load_tuning_settings(path).evaluation


def run_from_args(args: argparse.Namespace, *, tipgraph_config: str | None) -> int:
    """Render the report the arguments ask for; prints one line per file and a summary.

    Raises ValueError (bad arguments, nothing to report) and StoreError for the caller to
    print as one line.
    """
    bucket = BucketSpec.parse(args.bucket)
    log_filter = LogFilter(
        since=parse_timestamp(args.since, "--since"),
        until=parse_timestamp(args.until, "--until"),
        prompt_version=args.prompt_version,
        policy_name=args.policy,
    )
    evaluation = _evaluation(args.tuning_config)
    settings = resolve_paths(load_settings(tipgraph_config), Path.cwd())
    report, written = render_from_store(
        settings.store,
        Path(args.out),
        log_filter=log_filter,
        evaluation=evaluation,
        bucket=bucket,
        expected=configured_policies(settings),
        served=settings.policy,
    )
    for path in written:
        print(f"wrote {path}")
    print(summary(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuning.report", description=__doc__)
    parser.add_argument("--config", default=None, help="tipgraph YAML (default as tipgraph's)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run_from_args(args, tipgraph_config=args.config)
    except (OSError, ValueError, StoreError) as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
