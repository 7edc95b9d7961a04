"""``tipgraph`` command line: serve, simulate, compare-policies, tune, promote, rollback,
render-serve-config, render-k3s, render-config-docs, config show, token new, migrate,
guardrails check, retention run, bus setup, export, status, report, rehearse."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import yaml

from tipgraph.auth import (
    SCOPES,
    CredentialSource,
    TokenFileError,
    new_token,
    parse_scopes,
    token_entry_yaml,
)
from tipgraph.guardrails import evaluate_guardrails
from tipgraph.policy_comparison import compare, format_table
from tipgraph.progress import progress_bar
from tipgraph.reactions import definitions, set_up_streams
from tipgraph.registry import CHAMPION, PolicyRegistry, RegistryError, registry_exists
from tipgraph.retention import apply_retention
from tipgraph.serve_config import SERVE_ENV, render_serve_config_text
from tipgraph.settings import (
    MissingUserKeySecret,
    TipgraphSettings,
    load_settings,
    parse_policy,
    resolve_paths,
)
from tipgraph.simulated_tips import SimulatedModels
from tipgraph.simulator import Block, format_block, run_http, run_local, summarise
from tipgraph.store import LogFilter, StoreError, make_store, open_store
from tipgraph_ops.config_docs import render_config_docs
from tipgraph_ops.k3s import generated_files
from tipgraph_ops.registry_view import format_version, format_versions
from tipgraph_ops.rehearsal.runner import RehearsalOptions, run_rehearsal
from tipgraph_ops.rehearsal.scenarios import SCENARIOS, SHORT
from tipgraph_ops.status import collect, format_status
from tuning import report as report_command
from tuning import sweep as tune_command
from tuning.export import export_log, parse_timestamp

logger = logging.getLogger("tipgraph")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DRIFT = 0, 1, 2, 3
REHEARSAL_STORE_URL = "postgresql://postgres@127.0.0.1:5432/test"
READY_TIMEOUT_S = 120.0
READY_POLL_S = 0.25
LOCAL_DEV_TOKEN = "local-dev-token"  # what `make run` sets when TIPGRAPH_API_TOKEN is unset


def _serve(args: argparse.Namespace) -> int:
    # Before ray.init: the cluster's processes (controller, proxy, replicas) read these as
    # they start. Not at import: in a process that also calls handles (a test), throughput
    # mode would make every synchronous handle call fail.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name, value in SERVE_ENV.items():  # measured in BENCHMARKS.md
        os.environ.setdefault(name, value)
    import ray  # heavy: only `serve` starts a cluster
    from ray import serve

    # Heavy: the graph is Ray Serve's deployments (2 s to import); only `serve` needs it.
    from graphs.tipgraph import build_graph

    settings = resolve_paths(load_settings(args.config, args.overlay), Path.cwd())
    serve_settings = settings.serve.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    metrics = settings.metrics.model_copy(
        update={"export_port": args.metrics_port} if args.metrics_port is not None else {}
    )
    settings = settings.model_copy(update={"serve": serve_settings, "metrics": metrics})

    try:
        CredentialSource(settings.auth)  # what every ingress replica will check
    except TokenFileError as err:
        print(f"tipgraph: error: {err} (`make run` sets {LOCAL_DEV_TOKEN})", file=sys.stderr)
        return EXIT_USAGE
    try:
        settings.privacy.current_secret()
    except MissingUserKeySecret as err:
        print(f"tipgraph: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if settings.privacy.uses_dev_secret:
        print(
            "tipgraph: warning: user ids are pseudonymised with the public development key "
            "(privacy.allow_dev_secret): fine for a local run, never for real users",
            file=sys.stderr,
            flush=True,
        )
    ray.init(
        include_dashboard=False,
        num_cpus=args.num_cpus,
        log_to_driver=args.verbose,
        _metrics_export_port=metrics.export_port,
    )
    try:
        serve.start(http_options={"host": serve_settings.host, "port": serve_settings.port})
        serve.run(
            build_graph(settings),
            name=serve_settings.app_name,
            route_prefix=serve_settings.route_prefix,
        )
        url = f"http://{serve_settings.host}:{serve_settings.port}"
        _wait_until_ready(url + serve_settings.route_prefix.rstrip("/") + "/readyz")
        shown = _shown_token(settings)
        ray_address = ray.get_runtime_context().gcs_address
        print(
            f"tipgraph is serving on {url}  (API docs: {url}/docs; decision log: "
            f"{mask_secrets(settings.store.url)}; Prometheus metrics: "
            f"http://{serve_settings.host}:{metrics.export_port}/metrics). /v1 needs "
            f"'Authorization: Bearer {shown}'. `tipgraph status --ray-address {ray_address}` "
            "shows the deployments. Ctrl-C stops it.",
            flush=True,
        )

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        print("shutting down: flushing the decision log...", flush=True)
    finally:
        # Deleting the app waits for every replica's graceful shutdown, where the ingress
        # writes its buffered decisions; serve.shutdown alone gives up after 30 s and kills
        # them, which on a busy machine lost the buffer.
        with contextlib.suppress(Exception):
            serve.delete(serve_settings.app_name)
        # Also when the app failed to start: Serve's HAProxy would outlive this process and
        # hold its fixed ports against the next start.
        serve.shutdown()
        ray.shutdown()
    return EXIT_OK


def _wait_until_ready(readyz_url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Waits for ``readyz_url`` to answer 200 through the HTTP port users will call.

    ``serve.run`` returns once the replicas run, but the proxy (HAProxy here) learns the
    routes a moment later: a request sent at once could get a 404 or 503.  A server that
    is still not ready after ``timeout_s`` is reported, not stopped.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(readyz_url, timeout=5)
        except httpx.HTTPError as err:
            last = f"no answer ({type(err).__name__})"
        else:
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        time.sleep(READY_POLL_S)
    print(
        f"tipgraph: warning: {readyz_url} is still not ready after {timeout_s:g} s: {last}",
        file=sys.stderr,
        flush=True,
    )


def _simulate(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, args.overlay)
    where = "in process (no Ray, no HTTP)" if args.in_process else f"against {args.url}"
    print(
        f"simulating {args.users} users, {args.decisions} decisions {where} (seed {args.seed})",
        flush=True,
    )

    bar = progress_bar(args.decisions, "decisions", enabled=not args.no_progress)

    def show(block: Block) -> None:
        bar.update(block.last - bar.n)
        # Through the bar, so the block lines scroll above it instead of through it.
        bar.write(format_block(block))

    if args.simulated_llm and not args.in_process:
        print("tipgraph: error: --simulated-llm needs --in-process", file=sys.stderr)
        return EXIT_USAGE
    if args.in_process:
        if args.store_url:
            store = settings.store.model_copy(update={"url": args.store_url})
            settings = settings.model_copy(update={"store": store})
        llm = None
        if args.simulated_llm:
            llm = SimulatedModels()
            generation = settings.generation.model_copy(
                update={"source": "mixed", "serve_from": "pool"}
            )
            settings = settings.model_copy(update={"generation": generation})
        blocks = run_local(
            resolve_paths(settings, Path.cwd()),
            users=args.users,
            decisions=args.decisions,
            seed=args.seed,
            block=args.block,
            on_block=show,
            task_churn=args.task_churn,
            llm=llm,
        )
        if llm is not None:
            print(
                f"simulated LLM: {llm.generations} generations "
                f"({llm.generations / args.decisions:.3f} per decision), "
                f"{llm.judgements} judgements, {llm.embeddings} embedding calls"
            )
    else:
        blocks = run_http(
            args.url,
            users=args.users,
            decisions=args.decisions,
            seed=args.seed,
            block=args.block,
            rewards=settings.rewards,
            on_block=show,
            api_token=args.token,
            task_churn=args.task_churn,
        )
    bar.close()
    print(summarise(blocks))
    return EXIT_OK if all(block.errors == 0 for block in blocks) else EXIT_ERROR


def _compare_policies(args: argparse.Namespace) -> int:
    with open(args.policies, encoding="utf-8") as handle:
        entries = (yaml.safe_load(handle) or {}).get("policies", [])
    policies = [parse_policy(entry) for entry in entries]
    if args.only:
        policies = [p for p in policies if p.name in set(args.only.split(","))]
    if not policies:
        print(f"tipgraph: error: no policies selected from {args.policies}", file=sys.stderr)
        return EXIT_USAGE
    seeds = list(range(args.seeds))
    print(
        f"comparing {len(policies)} policies over seeds {seeds}, {args.decisions} decisions "
        f"each ({args.workers} worker processes)...",
        flush=True,
    )
    rows = compare(
        policies,
        seeds,
        users=args.users,
        decisions=args.decisions,
        last=args.last,
        workers=args.workers,
    )
    print(format_table(rows, seeds=len(seeds), decisions=args.decisions, last=args.last))
    return EXIT_OK


def _tune(args: argparse.Namespace) -> int:
    return tune_command.run_from_args(args, tipgraph_config=args.config)


def _report(args: argparse.Namespace) -> int:
    return report_command.run_from_args(args, tipgraph_config=args.config)


def _registry(args: argparse.Namespace):  # type: ignore[no-untyped-def]

    settings = load_settings(args.config, args.overlay).registry
    return PolicyRegistry(settings.tracking_uri, model_name=settings.model_name)


def _move_champion(args: argparse.Namespace, action: str) -> int:
    """``promote`` or ``rollback``: both move the champion alias and say why."""

    registry = _registry(args)
    try:
        if action == "promote":
            reason = registry.promote(force=args.force, by=f"tipgraph promote ({args.who})")
        else:
            reason = registry.rollback(by=f"tipgraph rollback ({args.who})")
    except RegistryError as err:
        print(f"tipgraph: {action} refused: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{registry.model_name}@{CHAMPION} -> version {registry.version_of(CHAMPION)}: {reason}")
    return EXIT_OK


def _registry_command(args: argparse.Namespace) -> int:
    """``registry list`` / ``registry show VERSION``: versions, evidence, lineage, history."""

    settings = load_settings(args.config, args.overlay).registry
    if not registry_exists(settings.tracking_uri):
        print(
            f"tipgraph: error: no model registry at {settings.tracking_uri} (nothing tuned "
            "yet, or another working directory / $MLFLOW_TRACKING_URI)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    registry = _registry(args)
    try:
        if args.registry_command == "list":
            records = registry.versions()
            text = format_versions(registry.model_name, records)
            data: object = [r.to_dict() for r in records]
        else:
            record = registry.describe(args.version)
            text = format_version(registry.model_name, record)
            data = record.to_dict()
    except RegistryError as err:
        print(f"tipgraph: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(data, indent=2) if args.format == "json" else text)
    return EXIT_OK


def _promote(args: argparse.Namespace) -> int:
    return _move_champion(args, "promote")


def _rollback(args: argparse.Namespace) -> int:
    return _move_champion(args, "rollback")


def _bus_setup(args: argparse.Namespace) -> int:
    bus = load_settings(args.config, args.overlay).bus
    if args.print_only:
        print(json.dumps(definitions(bus), indent=2))
        return EXIT_OK
    try:
        created = asyncio.run(set_up_streams(bus))
    except Exception as err:
        # nats-py raises OSError, its own errors or asyncio's, depending on where it failed.
        print(f"bus setup failed at {bus.url}: {err}", file=sys.stderr)
        return EXIT_ERROR
    for what in created:
        print(f"created {what}")
    if not created:
        print(f"{bus.stream}, {bus.dead_letter_stream} and {bus.durable} exist already")
    return EXIT_OK


def _render_serve_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, args.overlay)
    text = render_serve_config_text(settings, args.config_ref)
    return _write_or_check(Path(args.out), text, args.check, args.config_ref, "render-serve-config")


def _render_config_docs(args: argparse.Namespace) -> int:
    text = render_config_docs()
    return _write_or_check(
        Path(args.out), text, args.check, "the settings model", "render-config-docs"
    )


def _write_or_check(out: Path, text: str, check: bool, source: str, command: str) -> int:
    """Write a generated file, or with ``check`` exit 3 when the committed one drifted."""
    if check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is out of date with {source}; run `tipgraph {command}`", file=sys.stderr)
            return EXIT_DRIFT
        print(f"{out} matches {source}")
        return EXIT_OK
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return EXIT_OK


def _render_k3s(args: argparse.Namespace) -> int:
    stale = []
    for path, text in generated_files(Path(args.root)).items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(path))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            f"out of date with configs/: {', '.join(stale)}; run `tipgraph render-k3s`",
            file=sys.stderr,
        )
        return EXIT_DRIFT
    if args.check:
        print("k3s serveConfigV2 patches match configs/")
    return EXIT_OK


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")
MASK = "**********"


def mask_secrets(value: object) -> object:
    """The configuration with secrets hidden: SecretStr fields come out of pydantic as
    ``**********`` already; this also hides passwords inside URLs (``user:***@host``)."""
    if isinstance(value, dict):
        return {key: mask_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(rf"\g<scheme>\g<user>:{MASK}@", value)
    return value


def _shown_token(settings: TipgraphSettings) -> str:
    """How the startup line names the token: only make run's well-known local token is
    ever printed; a real one stays secret."""
    token = settings.auth.api_token
    if token is None:
        return f"<a token from {settings.auth.tokens_file}>"
    value = token.get_secret_value()
    return value if value == LOCAL_DEV_TOKEN else "$TIPGRAPH_API_TOKEN"


def _token_new(args: argparse.Namespace) -> int:
    scopes = parse_scopes(args.scopes)
    token = new_token()
    entry = token_entry_yaml(args.id, token, scopes)
    print(f"token (give it to the client; it is not stored anywhere): {token}", file=sys.stderr)
    print(entry, end="")
    return EXIT_OK


def _guardrails_check(args: argparse.Namespace) -> int:
    settings = resolve_paths(load_settings(args.config, args.overlay), Path.cwd())
    if not settings.experiment.guardrails:
        print("no guardrails configured (experiment.guardrails)")
        return EXIT_OK
    rollback_since = None
    registry = None
    judged = None
    if args.rollback and any(g.rollback for g in settings.experiment.guardrails):
        registry = PolicyRegistry(
            settings.registry.tracking_uri, model_name=settings.registry.model_name
        )
        champion = registry.champion_since()
        if champion is not None:
            judged, since = champion
            # Judged on the champion's own decisions (its replicas swap it in within a
            # check interval): a scheduled check rolls one bad model back once, not down
            # the chain.
            if since is not None:
                rollback_since = since + timedelta(seconds=settings.registry.check_interval_s)
    with open_store(settings.store) as store:
        results = evaluate_guardrails(
            store, settings.experiment, datetime.now(UTC), rollback_since=rollback_since
        )
    for result in results:
        mark = "CROSSED" if result.crossed else "ok"
        print(f"guardrail {result.name}: {mark}: {result.evidence}")
    crossed = [r for r in results if r.crossed]
    to_roll_back = [r for r in crossed if r.rollback]
    if registry is not None and to_roll_back:
        if judged is None:
            print(
                "tipgraph: error: rollback refused: no champion could be read from the "
                "registry, so the decisions cannot be tied to a model",
                file=sys.stderr,
            )
            return EXIT_ERROR
        evidence = "; ".join(f"guardrail {r.name}: {r.evidence}" for r in to_roll_back)
        try:
            reason = registry.rollback(
                by=f"tipgraph guardrails check ({evidence})", expected=judged
            )
        except RegistryError as err:
            print(f"tipgraph: error: rollback refused: {err}", file=sys.stderr)
            return EXIT_ERROR
        print(f"{settings.registry.model_name}@{CHAMPION}: {reason}")
    return EXIT_ERROR if crossed else EXIT_OK


def _retention_run(args: argparse.Namespace) -> int:
    settings = resolve_paths(load_settings(args.config, args.overlay), Path.cwd())
    days = args.days if args.days is not None else settings.retention.days
    if days is None:
        print(
            "tipgraph: error: retention.days is not set (keep forever): give --days",
            file=sys.stderr,
        )
        return EXIT_USAGE
    with open_store(settings.store) as store:
        expired = apply_retention(
            store, days=days, now=datetime.now(UTC), batch_size=settings.retention.batch_size
        )
    print(
        f"retention ({days} days) on {mask_secrets(settings.store.url)}: deleted "
        f"{expired.decisions} decisions, {expired.feedback} feedback, "
        f"{expired.policy_runs} policy runs, {expired.embeddings} embeddings; "
        "rewards keep what was learned"
    )
    return EXIT_OK


def _config_show(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, args.overlay)
    shown = mask_secrets(settings.model_dump(mode="json"))
    if args.format == "json":
        print(json.dumps(shown, indent=2))
    else:
        print(yaml.safe_dump(shown, sort_keys=False), end="")
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, args.overlay).store
    store = make_store(settings)
    try:
        store.open()  # applies every pending migration, in order, idempotently
        version = store.schema_version()
    finally:
        store.close()
    print(f"decision store {mask_secrets(settings.url)}: schema version {version}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    settings = resolve_paths(load_settings(args.config, args.overlay), Path.cwd())
    serve = settings.serve
    host = "127.0.0.1" if serve.host in ("0.0.0.0", "::") else serve.host
    url = args.url or f"http://{host}:{serve.port}{serve.route_prefix.rstrip('/')}"
    status = collect(settings, ray_address=args.ray_address, url=url)
    if args.format == "json":
        print(json.dumps(mask_secrets(status.to_dict()), indent=2))
    else:
        print(format_status(status))
    return EXIT_OK if status.healthy else EXIT_ERROR


def _rehearse(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "ollama_stub.py").exists():
        print("tipgraph: error: rehearse runs from a source checkout", file=sys.stderr)
        return EXIT_ERROR
    options = RehearsalOptions(
        root=root,
        out_dir=Path(args.out).resolve(),
        store_url=args.store_url,
        scenarios=SHORT if args.short else tuple(args.scenario or SCENARIOS),
        llm_latency_s=args.llm_latency_s,
        concurrency=args.concurrency,
    )
    result = run_rehearsal(options, log=lambda line: print(line, flush=True))
    print(f"\nwrote {options.out_dir / 'result.json'} and {options.out_dir / 'timeline.png'}")
    return EXIT_OK if result["passed"] else EXIT_ERROR


def _export(args: argparse.Namespace) -> int:
    log_filter = LogFilter(
        since=parse_timestamp(args.since, "--since"),
        until=parse_timestamp(args.until, "--until"),
        prompt_version=args.prompt_version,
        policy_name=args.policy,
    )
    settings = resolve_paths(load_settings(args.config, args.overlay), Path.cwd())
    with (
        open_store(settings.store) as store,
        progress_bar(None, "decisions", enabled=not args.no_progress) as bar,
    ):

        def advance(done: int) -> None:
            bar.update(done - bar.n)

        events, rows = export_log(
            store,
            Path(args.out),
            log_filter=log_filter,
            feature_version=args.feature_version,
            on_progress=advance,
        )
    print(f"exported {events} decisions ({rows} candidate rows) to {args.out}")
    return EXIT_OK


def _add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none anyway when stderr is not a terminal)",
    )


if TYPE_CHECKING:  # subscriptable for the type checker only
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tipgraph", description=__doc__)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML config (default: $TIPGRAPH_CONFIG or configs/tipgraph.yaml)",
    )
    parser.add_argument(
        "--overlay",
        action="append",
        default=[],
        metavar="YAML",
        help="merged on top of the config, in order, as the k3s pods merge "
        "configs/k3s/base.yaml and configs/k3s/<env>.yaml (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray worker logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serving_commands(commands)
    _add_learning_commands(commands)
    _add_generated_file_commands(commands)
    _add_operations_commands(commands)
    return parser


def _add_serving_commands(commands: Commands) -> None:
    """serve, simulate."""
    serve = commands.add_parser("serve", help="run the Serve graph locally")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="Prometheus endpoint port (default: the config's metrics.export_port, 8080)",
    )
    serve.set_defaults(func=_serve)

    simulate = commands.add_parser("simulate", help="synthetic users against a running graph")
    simulate.add_argument("--url", default="http://127.0.0.1:8000")
    simulate.add_argument(
        "--token",
        default=os.environ.get("TIPGRAPH_API_TOKEN", LOCAL_DEV_TOKEN),
        help="bearer token for /v1 (default: $TIPGRAPH_API_TOKEN, else make run's local-dev-token)",
    )
    simulate.add_argument("--users", type=int, default=50)
    simulate.add_argument("--decisions", type=int, default=5000)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument(
        "--block", type=int, default=500, help="print the mean reward every BLOCK decisions"
    )
    simulate.add_argument(
        "--in-process",
        action="store_true",
        help="run every stage in this process (no Ray, no HTTP) instead of calling --url",
    )
    simulate.add_argument(
        "--store-url",
        default=None,
        help="with --in-process: decision log URL (default: the config's store.url)",
    )
    simulate.add_argument(
        "--task-churn",
        type=float,
        default=1.0,
        help="chance that a returning user's task list changed (default 1: new every visit)",
    )
    simulate.add_argument(
        "--simulated-llm",
        action="store_true",
        help="with --in-process: mixed mode from the candidate pool, the three model aliases "
        "answered in process (tipgraph.simulated_tips)",
    )
    _add_no_progress(simulate)
    simulate.set_defaults(func=_simulate)


def _add_learning_commands(commands: Commands) -> None:
    """compare-policies, tune, report, promote, rollback, registry."""
    comparison = commands.add_parser(
        "compare-policies", help="every policy on the simulator over several seeds (in process)"
    )
    comparison.add_argument("--policies", default="configs/policies.yaml")
    comparison.add_argument("--only", default=None, help="comma-separated policy names")
    comparison.add_argument("--seeds", type=int, default=5)
    comparison.add_argument("--users", type=int, default=50)
    comparison.add_argument("--decisions", type=int, default=20_000)
    comparison.add_argument(
        "--last", type=int, default=5_000, help="average over the last LAST decisions"
    )
    comparison.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    comparison.set_defaults(func=_compare_policies)

    tune = commands.add_parser(
        "tune", help="Ray Tune sweep on the logged rewards; registers the winner as challenger"
    )
    tune_command.add_arguments(tune)
    tune.set_defaults(func=_tune)

    report = commands.add_parser(
        "report",
        help="plots of the decision log (OPE value per policy, reward over time, shadow "
        "agreement, value per prompt_version, fallback rate) as PNGs + one HTML page",
    )
    report_command.add_arguments(report)
    report.set_defaults(func=_report)

    who = os.environ.get("USER", "unknown")
    promote = commands.add_parser(
        "promote", help="move the champion alias to the challenger if the evidence says so"
    )
    promote.add_argument(
        "--force", action="store_true", help="skip the evidence gate (recorded as forced)"
    )
    promote.add_argument("--who", default=who, help="recorded with the promotion")
    promote.set_defaults(func=_promote)
    rollback = commands.add_parser("rollback", help="point the champion back at the previous one")
    rollback.add_argument("--who", default=who, help="recorded with the rollback")
    rollback.set_defaults(func=_rollback)
    registry = commands.add_parser(
        "registry", help="the model registry's versions: evidence, baseline, lineage, history"
    )
    registry_commands = registry.add_subparsers(
        dest="registry_command", required=True, metavar="ACTION"
    )
    registry_list = registry_commands.add_parser("list", help="every version, newest first")
    registry_show = registry_commands.add_parser("show", help="one version in full")
    registry_show.add_argument("version", help="a version number, or an alias as @champion")
    for sub in (registry_list, registry_show):
        sub.add_argument("--format", choices=("text", "json"), default="text")
    registry.set_defaults(func=_registry_command)


def _add_generated_file_commands(commands: Commands) -> None:
    """render-serve-config, render-k3s, render-config-docs."""
    render = commands.add_parser(
        "render-serve-config", help="write serve_config.yaml from the config"
    )
    render.add_argument("--out", default="serve_config.yaml")
    render.add_argument(
        "--config-ref",
        default="configs/tipgraph.yaml",
        help="config path written into the Serve config's args",
    )
    render.add_argument(
        "--check", action="store_true", help="exit 3 if the file differs instead of writing it"
    )
    render.set_defaults(func=_render_serve_config)

    k3s = commands.add_parser(
        "render-k3s", help="write the RayService serveConfigV2 patches of the k3s overlays"
    )
    k3s.add_argument("--root", default=".", help="the repository root")
    k3s.add_argument(
        "--check", action="store_true", help="exit 3 if a patch differs instead of writing it"
    )
    k3s.set_defaults(func=_render_k3s)

    config_docs = commands.add_parser(
        "render-config-docs", help="write docs/configuration.md from the settings model"
    )
    config_docs.add_argument("--out", default="docs/configuration.md")
    config_docs.add_argument(
        "--check", action="store_true", help="exit 3 if the file differs instead of writing it"
    )
    config_docs.set_defaults(func=_render_config_docs)


def _action(
    commands: Commands, group: str, group_help: str, action: str, action_help: str
) -> argparse.ArgumentParser:
    """``tipgraph <group> <action>``: a command group with its (first) action's parser."""
    parser = commands.add_parser(group, help=group_help)
    actions = parser.add_subparsers(dest=f"{group}_command", required=True, metavar="ACTION")
    return actions.add_parser(action, help=action_help)


def _add_operations_commands(commands: Commands) -> None:
    """config show, token new, guardrails check, retention run, bus setup, migrate, status,
    export."""
    config = commands.add_parser("config", help="inspect the effective configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser(
        "show", help="print the configuration after YAML and environment, secrets masked"
    )
    show.add_argument("--format", choices=("yaml", "json"), default="yaml")
    show.set_defaults(func=_config_show)

    token_new = _action(
        commands,
        "token",
        "API tokens (auth.tokens_file)",
        "new",
        "a new random token: the token on stderr (for the client), its tokens_file entry "
        "(the hash, never the token) on stdout",
    )
    token_new.add_argument("--id", required=True, help="names the token in logs and metrics")
    token_new.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(SCOPES)}")
    token_new.set_defaults(func=_token_new)

    check = _action(
        commands,
        "guardrails",
        "the experiment's guardrails (experiment.guardrails)",
        "check",
        "judge every guardrail on its window, one line each (exit 1 if one is crossed)",
    )
    check.add_argument(
        "--rollback",
        action="store_true",
        help="point the champion back at the previous one when a guardrail configured with "
        "rollback: true is crossed, the evidence in the registry's history",
    )
    check.set_defaults(func=_guardrails_check)

    retention_run = _action(
        commands,
        "retention",
        "apply the decision log's retention (retention.days)",
        "run",
        "delete decisions older than retention.days with their candidates, scores and "
        "feedback, now; rewards keep what was learned",
    )
    retention_run.add_argument(
        "--days", type=int, default=None, help="override retention.days (at least 1)"
    )
    retention_run.set_defaults(func=_retention_run)

    bus_setup = _action(
        commands,
        "bus",
        "the NATS JetStream streams of reactions and dead letters (bus)",
        "setup",
        "create the streams and the durable consumer where missing (idempotent)",
    )
    bus_setup.add_argument(
        "--print",
        dest="print_only",
        action="store_true",
        help="print the definitions as JSON (JetStream's API form) instead",
    )
    bus_setup.set_defaults(func=_bus_setup)

    migrate = commands.add_parser(
        "migrate", help="apply the decision store's pending migrations (idempotent)"
    )
    migrate.set_defaults(func=_migrate)

    status = commands.add_parser(
        "status",
        help="Serve applications and replicas, champion version, decision-log backlog "
        "(exit 1 if anything is unhealthy or unreachable)",
    )
    status.add_argument(
        "--ray-address", default="auto", help="the Ray cluster (default: the local one)"
    )
    status.add_argument(
        "--url", default=None, help="the app's base URL (default: from the config's serve.*)"
    )
    status.add_argument("--format", choices=("text", "json"), default="text")
    status.set_defaults(func=_status)

    rehearse = commands.add_parser(
        "rehearse",
        help="3 Ray nodes on this machine, Postgres and the Ollama stub: scale out and in, "
        "in-place update, node loss and database restart under load "
        "(var/rehearsal/result.json, timeline.png; exit 1 if a scenario fails)",
    )
    rehearse.add_argument(
        "--short", action="store_true", help="the CI form: " + " and ".join(SHORT)
    )
    rehearse.add_argument(
        "--scenario", action="append", choices=list(SCENARIOS), help="only these, in order"
    )
    rehearse.add_argument("--llm-latency-s", type=float, default=0.5)
    rehearse.add_argument("--concurrency", type=int, default=16)
    rehearse.add_argument(
        "--store-url",
        default=os.environ.get("TIPGRAPH_REHEARSAL_STORE_URL", REHEARSAL_STORE_URL),
        help="Postgres for the decisions; each run uses a schema of its own",
    )
    rehearse.add_argument("--out", default="var/rehearsal")
    rehearse.set_defaults(func=_rehearse)

    export = commands.add_parser(
        "export", help="logged decisions with rewards to CSV or Parquet (the import format)"
    )
    export.add_argument("--out", required=True, help="a .csv or .parquet file")
    export.add_argument("--since", default=None, help="ISO 8601, inclusive")
    export.add_argument("--until", default=None, help="ISO 8601, exclusive")
    export.add_argument("--policy", default=None, help="only decisions served by this policy")
    export.add_argument("--prompt-version", default=None)
    export.add_argument("--feature-version", default=None)
    _add_no_progress(export)
    export.set_defaults(func=_export)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:
        # MLflow logs at INFO through a handler of its own, set up when it is first imported
        # (e.g. "Creating initial MLflow database tables..." on a new registry).
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in ("users", "decisions", "block", "seeds", "last", "workers", "concurrency", "days"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    try:
        code: int = args.func(args)
    except (OSError, ValueError, StoreError) as err:
        print(f"tipgraph: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    return code


if __name__ == "__main__":
    sys.exit(main())
