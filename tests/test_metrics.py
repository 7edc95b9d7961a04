"""Metrics and structured logs: what is counted (plain Python, a recording sink), what a real
Serve app exports on Ray's metrics port and writes to its log files, and the artifacts that
name the metrics (the Grafana dashboard, the runbook, the k3s scrape settings)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from graphs.tipgraph import PROJECT_ROOT, build_graph
from tests.conftest import AUTH_HEADERS, TEST_API_TOKEN, free_port
from tests.factories import local_service, task, tip_body
from tipgraph.contracts import FeedbackRequest, TipRequest
from tipgraph.decision_log import DecisionLog
from tipgraph.event_ids import new_event_id
from tipgraph.features import build_context
from tipgraph.generation import Completion, LLMUnavailable, TipGenerator, load_split
from tipgraph.generation.breaker import CircuitBreaker
from tipgraph.logs import APP_LOGGERS, SERVE_LOGGER, route_to_serve_log
from tipgraph.metrics import (
    EXPORT_PREFIX,
    METRICS,
    Metrics,
    MetricSpec,
    version_tag,
)
from tipgraph.privacy import pseudonymise
from tipgraph.serve_config import all_deployment_options
from tipgraph.service import TipService
from tipgraph.settings import (
    GenerationSettings,
    RewardSettings,
    StoreSettings,
    TipgraphSettings,
    load_settings,
)
from tipgraph.store import DecisionStore, SQLiteStore, open_store
from tipgraph.store.records import PolicyScoresRecord
from tipgraph.wiring import decision_log

DASHBOARD = PROJECT_ROOT / "k3s" / "monitoring" / "grafana-dashboard.json"
POD_MONITOR = PROJECT_ROOT / "k3s" / "monitoring" / "podmonitor.yaml"
RUNBOOK = PROJECT_ROOT / "k3s" / "README.md"
# Tags Ray Serve adds to every series, and the histogram bucket bound.
SERVE_TAGS = {"application", "deployment", "replica", "le"}
PERSONAL_TAGS = {"user_id", "user_key", "event_id", "task_id", "content", "request_id"}


@dataclass
class RecordingSink:
    """Every recorded point, as (kind, metric name, value, tags)."""

    points: list[tuple[str, str, float, dict[str, str]]] = field(default_factory=list)

    def inc(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._record("counter", metric, value, tags)

    def set(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._record("gauge", metric, value, tags)

    def observe(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._record("histogram", metric, value, tags)

    def _record(self, kind: str, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        # What Ray would refuse: a kind or tag set other than the definition's.
        assert kind == metric.kind and set(tags) == set(metric.tags), (metric, tags)
        assert kind != "counter" or value > 0, "a counter only moves up"
        self.points.append((kind, metric.name, float(value), dict(tags)))

    def total(self, name: str, **tags: str) -> float:
        return sum(
            value
            for _, metric, value, point_tags in self.points
            if metric == name and tags.items() <= point_tags.items()
        )

    def values(self, name: str, **tags: str) -> list[float]:
        return [
            value
            for _, metric, value, point_tags in self.points
            if metric == name and tags.items() <= point_tags.items()
        ]

    def tags(self, name: str) -> list[dict[str, str]]:
        return [point_tags for _, metric, _, point_tags in self.points if metric == name]


# -- the definitions ---------------------------------------------------------------------------
def test_every_metric_is_defined_once_documented_and_tagged_without_personal_data() -> None:
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    for spec in METRICS:
        assert re.fullmatch(r"tipgraph_[a-z0-9_]+", spec.name), spec.name
        assert not spec.name.endswith("_total"), "Ray adds _total to counters"
        assert spec.help.strip().endswith("."), spec.name
        assert not set(spec.tags) & (PERSONAL_TAGS | SERVE_TAGS), spec.name
        assert (spec.kind == "histogram") == bool(spec.buckets), spec.name
        assert list(spec.buckets) == sorted(spec.buckets) and all(b > 0 for b in spec.buckets)


@pytest.mark.parametrize(
    ("version", "tag"),
    [
        ("linucb-1a2b3c4d.1742", "linucb-1a2b3c4d"),
        ("linucb-1a2b3c4d.0", "linucb-1a2b3c4d"),
        ("tip-policy/3+lints-0badf00d.17", "tip-policy/3+lints-0badf00d"),
        ("v0-old", "v0-old"),
        ("model.v2", "model.v2"),
    ],
)
def test_a_version_tag_drops_the_update_count(version: str, tag: str) -> None:
    assert version_tag(version) == tag


# -- what the plain-Python code counts ------------------------------------------------------------
SHADOWS = [
    {"policy": {"name": "egreedy", "kind": "egreedy", "epsilon": 0.5}},
    {"policy": {"name": "uniform", "kind": "uniform"}},
    {"policy": {"name": "broken", "kind": "uniform"}, "fault": {"fail": True}},
]


@pytest.fixture
def settings(tmp_path: Path) -> TipgraphSettings:
    return TipgraphSettings(store={"url": f"sqlite:///{tmp_path}/log.db"}, shadows=SHADOWS)


@pytest.fixture
def store(settings: TipgraphSettings) -> Iterator[DecisionStore]:
    with open_store(settings.store) as opened:
        yield opened


def counted_service(
    settings: TipgraphSettings, store: DecisionStore
) -> tuple[TipService, RecordingSink]:
    sink = RecordingSink()
    log = decision_log(store, StoreSettings(flush_interval_s=0.01), owner="test")
    service = local_service(settings, store, log, metrics=Metrics(sink))
    return service, sink


async def test_a_served_decision_counts_its_policy_and_every_stage_latency(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service, sink = counted_service(settings, store)
    responses = [await service.tip(TipRequest(**tip_body())) for _ in range(3)]
    await service.close()

    (served,) = {
        tuple(sorted(t.items())) for t in sink.tags("tipgraph_decisions") if t["role"] == "served"
    }
    version = responses[0].policy.version
    assert dict(served) == {
        "policy": "linucb",
        "policy_version": version_tag(version),
        "role": "served",
    }
    assert sink.total("tipgraph_decisions", role="served") == 3
    for stage in ("context", "generation", "scoring", "total"):
        observed = sink.values("tipgraph_stage_latency_ms", stage=stage)
        expected = [getattr(r.latency_ms, stage) for r in responses]
        assert observed == pytest.approx(expected)


async def test_shadows_count_their_picks_agreement_and_failures(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service, sink = counted_service(settings, store)
    n = 12
    for _ in range(n):
        await service.tip(TipRequest(**tip_body()))
    await service.close()

    assert isinstance(store, SQLiteStore)
    with closing(sqlite3.connect(store.path)) as conn:
        rows = conn.execute(
            "SELECT s.policy_name, s.chosen_candidate_id = d.chosen_candidate_id "
            "FROM policy_runs s JOIN decisions d ON d.event_id = s.event_id "
            "WHERE s.role = 'shadow' AND s.error IS NULL"
        ).fetchall()
    for name in ("egreedy", "uniform"):
        agreed = sum(1 for policy, same in rows if policy == name and same)
        assert sink.total("tipgraph_decisions", policy=name, role="shadow") == n
        assert sink.total("tipgraph_shadow_comparisons", policy=name) == n
        # Counted as the logged runs say: the shadow's pick against the served one.
        assert sink.total("tipgraph_shadow_comparisons", policy=name, agreed="true") == agreed
    assert sink.total("tipgraph_shadow_comparisons", policy="uniform", agreed="false") > 0
    # A failing shadow has no picks to compare: it counts failures, once per event.
    assert sink.total("tipgraph_decisions", policy="broken") == 0
    assert sink.total("tipgraph_shadow_comparisons", policy="broken") == 0
    assert sink.total("tipgraph_shadow_failures", policy="broken") == n


def run(policy: str, chosen: str | None, error: str | None = None) -> PolicyScoresRecord:
    return PolicyScoresRecord(
        policy_name=policy,
        policy_version="egreedy-0badf00d.41",
        role="shadow",
        scores=[] if error else [0.1, 0.9],
        probabilities=[] if error else [0.5, 0.5],
        chosen_candidate_id=chosen,
        chosen_probability=None if error else 0.5,
        latency_ms=1.0,
        error=error,
    )


def test_a_shadow_replica_counts_its_pick_against_the_served_one() -> None:
    """What each shadow records in the shadows replica for each event it scores."""
    sink = RecordingSink()
    metrics = Metrics(sink)
    metrics.shadow_run(run("egreedy", "c1"), "c1")
    metrics.shadow_run(run("egreedy", "c2"), "c1")
    metrics.shadow_run(run("egreedy", None, error="InjectedFault: no"), "c1")
    assert sink.tags("tipgraph_shadow_comparisons") == [
        {"policy": "egreedy", "agreed": "true"},
        {"policy": "egreedy", "agreed": "false"},
    ]
    assert (
        sink.tags("tipgraph_decisions")
        == [{"policy": "egreedy", "policy_version": "egreedy-0badf00d", "role": "shadow"}] * 2
    )
    assert sink.tags("tipgraph_shadow_failures") == []  # the ingress reports failures


async def test_feedback_counts_one_reward_for_the_served_policy(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    service, sink = counted_service(settings, store)
    done = await service.tip(TipRequest(**tip_body()))
    snoozed = await service.tip(TipRequest(**tip_body()))
    for _ in range(2):  # a repeat is not a second reward
        await service.feedback(FeedbackRequest(event_id=done.event_id, reaction="done"))
    await service.feedback(FeedbackRequest(event_id=snoozed.event_id, reaction="snooze"))
    unwritten = new_event_id(settings.privacy.user_key_secret.get_secret_value())
    held = await service.feedback(FeedbackRequest(event_id=unwritten, reaction="done"))
    assert held.status == "pending"
    service.sample_metrics()
    await service.close()

    tags = {"policy": "linucb", "policy_version": version_tag(done.policy.version)}
    assert sink.tags("tipgraph_rewards") == [
        {**tags, "reaction": "done"},
        {**tags, "reaction": "snooze"},
    ]
    assert sink.values("tipgraph_reward_sum") == [1.0, 0.25]
    assert sink.tags("tipgraph_reward_sum") == [tags, tags]
    assert sink.values("tipgraph_feedback_held") == [1.0]


async def test_default_rewards_are_counted(
    settings: TipgraphSettings, store: DecisionStore
) -> None:
    quick = settings.model_copy(
        update={"learning": settings.learning.model_copy(update={"reward_wait_s": 0.05})}
    )
    service, sink = counted_service(quick, store)
    for _ in range(2):
        await service.tip(TipRequest(**tip_body()))
    await service.log.flush()
    assert service.apply_default_rewards() == 0
    await asyncio.sleep(0.1)
    assert service.apply_default_rewards() == 2
    await service.close()
    assert sink.values("tipgraph_default_rewards") == [2.0]


class FakeLLM:
    """A completer that answers with whatever the test scripts: an error, garbage, JSON."""

    def __init__(self) -> None:
        self.answer: Callable[[], str] = lambda: '{"tips": []}'
        self.calls = 0

    async def __call__(
        self, alias: str, messages: list[dict[str, str]], timeout_s: float
    ) -> Completion:
        self.calls += 1
        return Completion(text=self.answer(), model="fake/model")


def dead() -> str:
    raise LLMUnavailable("ConnectionError: refused")


async def test_every_generation_fallback_is_counted_by_reason_and_the_breaker_sampled() -> None:
    settings = GenerationSettings(
        source="llm",
        prompts_dir=str(PROJECT_ROOT / "configs" / "prompts"),
        timeout_s=0.2,
        breaker={"failure_threshold": 10, "reset_after_s": 30},
    )
    now = [0.0]
    breaker = CircuitBreaker(10, 30, clock=lambda: now[0])
    llm, sink = FakeLLM(), RecordingSink()
    metrics = Metrics(sink)
    generator = TipGenerator(
        settings,
        split=load_split(Path(settings.prompts_dir), settings.prompts),
        completer=llm,
        breaker=breaker,
        metrics=metrics,
    )
    request = TipRequest(**tip_body())
    context = build_context(request, [], RewardSettings())

    async def generate() -> str | None:
        result = await generator.generate(request, context, uuid.uuid4().hex, 4)
        return result.reason

    llm.answer = lambda: '{"tips": [{"content": "Do it.", "kind": "focus"}]}'
    assert await generate() is None  # served by the LLM: no fallback
    llm.answer = dead
    await generate()
    llm.answer = lambda: "not json"
    await generate()
    llm.answer = lambda: '{"tips": [{"content": "", "kind": "focus"}]}'
    await generate()

    async def slow(*_: object) -> Completion:
        await asyncio.sleep(1)
        raise AssertionError("the budget is 0.2 s")

    generator.completer = slow
    await generate()
    generator.completer, llm.answer = llm, dead
    assert sink.tags("tipgraph_generation_fallbacks") == [
        {"reason": "llm_error"},
        {"reason": "malformed_answer"},
        {"reason": "no_valid_tips"},
        {"reason": "timeout"},
    ]
    metrics.sample_breaker(breaker)
    for _ in range(6):  # ten failures in a row open the circuit
        await generate()
    metrics.sample_breaker(breaker)
    reason = await generate()
    assert reason == "circuit open"
    assert sink.total("tipgraph_generation_fallbacks", reason="circuit_open") == 1
    now[0] = 30.0  # half-open once reset_after_s has passed
    metrics.sample_breaker(breaker)
    metrics.sample_breaker(breaker)
    assert sink.values("tipgraph_generation_breaker_state") == [0.0, 2.0, 1.0, 1.0]
    assert sink.values("tipgraph_generation_breaker_opened") == [1.0]  # once, not per sample


async def test_decision_log_gauges_follow_the_backlog_and_the_spill_file(tmp_path: Path) -> None:
    from tests.test_store import make_decision

    sink = RecordingSink()
    metrics = Metrics(sink)
    with open_store(TipgraphSettings(store={"url": f"sqlite:///{tmp_path}/log.db"}).store) as store:
        spill = tmp_path / "spill"
        log = DecisionLog(
            store, flush_interval_s=60, batch_size=64, max_buffered=2, spill_dir=spill, owner="i"
        )
        metrics.sample_decision_log(log)
        for i in range(5):
            await log.submit(make_decision(f"e{i}"))
        metrics.sample_decision_log(log)
        (segment,) = spill.glob("i-*.wal")
        size = segment.stat().st_size
        await log.close()
        metrics.sample_decision_log(log)
    assert sink.values("tipgraph_decision_log_backlog") == [0, 5, 0]
    assert sink.values("tipgraph_decision_log_spilled") == [0, 3, 0]
    assert sink.values("tipgraph_decision_log_spill_bytes") == [0, size, 0] and size > 0


def test_a_retention_run_counts_what_it_deleted_and_an_empty_one_nothing(
    tmp_path: Path,
) -> None:
    from datetime import UTC, datetime, timedelta

    from tests.test_store import make_decision, make_feedback
    from tipgraph.retention import RetentionJob

    sink = RecordingSink()
    settings = TipgraphSettings(store={"url": f"sqlite:///{tmp_path}/log.db"})
    old = datetime.now(UTC) - timedelta(days=(settings.retention.days or 0) + 1)
    with open_store(settings.store) as store:
        store.write_decisions([make_decision(f"e{i}", created_at=old) for i in range(3)])
        store.record_feedback(make_feedback("e0", at=old))
        job = RetentionJob(store, settings.retention, Metrics(sink))
        job.run()
        job.run()
    assert sink.total("tipgraph_retention_deleted", rows="decisions") == 3
    assert sink.total("tipgraph_retention_deleted", rows="feedback") == 1
    assert sink.total("tipgraph_retention_deleted", rows="policy_runs") == 3
    assert len(sink.points) == 3  # the second run found nothing: no point at all


# -- logs ------------------------------------------------------------------------------------------
class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def serve_logger() -> Iterator[Capture]:
    """Stands in for the replica's ``ray.serve`` logger; every logger is restored after."""
    loggers = [logging.getLogger(name) for name in (SERVE_LOGGER, *APP_LOGGERS)]
    saved = [(lg, lg.level, lg.propagate, list(lg.handlers)) for lg in loggers]
    capture = Capture()
    serve = logging.getLogger(SERVE_LOGGER)
    serve.handlers = [capture]
    serve.propagate = False
    try:
        yield capture
    finally:
        for lg, level, propagate, handlers in saved:
            lg.setLevel(level)
            lg.propagate = propagate
            lg.handlers = handlers


@pytest.fixture
def root_logger() -> Iterator[Capture]:
    capture = Capture()
    logging.getLogger().addHandler(capture)
    try:
        yield capture
    finally:
        logging.getLogger().removeHandler(capture)


async def test_tipgraph_lines_reach_serve_logs_with_the_event_id_and_nothing_personal(
    settings: TipgraphSettings,
    store: DecisionStore,
    serve_logger: Capture,
    root_logger: Capture,
) -> None:
    route_to_serve_log("INFO")
    route_to_serve_log("INFO")  # idempotent: one handler, one copy of each line
    service, _ = counted_service(settings, store)
    user, title = "mallory@example.com", "Confidential merger with Initech"
    body = tip_body(user_id=user, tasks=[task("secret-task", title, priority=4), task("t2")])
    tip = await service.tip(TipRequest(**body))
    await service.feedback(FeedbackRequest(event_id=tip.event_id, reaction="done"))
    await service.close()

    lines = {r.getMessage(): r for r in serve_logger.records}
    assert lines["tip served"].event_id == tip.event_id  # type: ignore[attr-defined]
    assert lines["tip served"].policy == "linucb"  # type: ignore[attr-defined]
    assert lines["feedback recorded"].event_id == tip.event_id  # type: ignore[attr-defined]
    # Not also to the root logger, which writes the worker's stderr file.
    assert [r for r in root_logger.records if r.name.startswith(APP_LOGGERS)] == []
    for record in serve_logger.records:
        text = json.dumps({**record.__dict__, "msg": record.getMessage()}, default=str)
        for needle in (user, title, "secret-task", tip.tip.content):
            assert needle not in text


async def test_the_access_lines_can_be_switched_off(
    settings: TipgraphSettings, store: DecisionStore, serve_logger: Capture
) -> None:
    route_to_serve_log("INFO")
    quiet = settings.model_copy(
        update={"logs": settings.logs.model_copy(update={"access_log": False})}
    )
    service, _ = counted_service(quiet, store)
    tip = await service.tip(TipRequest(**tip_body()))
    await service.feedback(FeedbackRequest(event_id=tip.event_id, reaction="done"))
    await service.close()
    assert not [r for r in serve_logger.records if getattr(r, "event_id", None) == tip.event_id]


def test_every_deployment_gets_the_logging_config_from_the_settings() -> None:
    from ray.serve.schema import LoggingConfig

    settings = load_settings(PROJECT_ROOT / "configs" / "tipgraph.yaml")
    settings = settings.model_copy(
        update={"logs": settings.logs.model_copy(update={"level": "WARNING", "dir": "/x"})}
    )
    options = all_deployment_options(settings)
    assert {"ingress", "context", "generation", "scoring", "shadows"} <= set(options)
    for name, option in options.items():
        config = LoggingConfig(**option["logging_config"])
        assert (config.encoding, config.log_level, config.logs_dir) == ("JSON", "WARNING", "/x")
        assert config.enable_access_log is True, name


# -- the dashboard, the runbook and the k3s scrape settings ----------------------------------------
EXPORTED = {name for spec in METRICS for name in spec.exported}
TAGS = {tag for spec in METRICS for tag in spec.tags} | SERVE_TAGS


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert panels, "the dashboard has no panels"
    queries = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert all(panel.get("targets") for panel in panels), "a panel without a query"
    return queries


def test_the_dashboard_queries_only_and_every_metric_the_code_defines() -> None:
    queries = dashboard_queries()
    used = {name for query in queries for name in re.findall(r"\bray_tipgraph_\w+", query)}
    assert used <= EXPORTED, f"unknown metrics: {sorted(used - EXPORTED)}"
    for spec in METRICS:
        assert used & set(spec.exported), f"no panel shows {spec.name}"
    for query in queries:
        grouped = re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", query)
        matched = re.findall(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)", query)
        labels = {label.strip() for group in grouped for label in group.split(",")} | set(matched)
        assert labels - {""} <= TAGS, f"{query}: unknown labels {sorted(labels - TAGS)}"


def test_the_runbook_names_every_exported_metric_and_the_scrape_endpoint() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    for spec in METRICS:
        assert spec.exported[0].removesuffix("_bucket") in text, spec.name
        for tag in spec.tags:
            assert tag in text, (spec.name, tag)
    settings = load_settings(PROJECT_ROOT / "configs" / "tipgraph.yaml")
    assert f":{settings.metrics.export_port}/metrics" in text


def test_every_ray_pod_exports_metrics_where_the_settings_say() -> None:
    from tipgraph_ops.k3s import OVERLAYS, kustomize_build, overlay_settings

    for env in OVERLAYS:
        port = overlay_settings(PROJECT_ROOT, env).metrics.export_port
        (service,) = [
            d
            for d in kustomize_build(PROJECT_ROOT / "k3s" / "overlays" / env)
            if d["kind"] == "RayService"
        ]
        cluster = service["spec"]["rayClusterConfig"]
        for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
            assert group["rayStartParams"]["metrics-export-port"] == str(port)
            template = group["template"]
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/port"] == str(port)
            assert annotations["prometheus.io/path"] == "/metrics"
            ports = template["spec"]["containers"][0]["ports"]
            assert {"name": "metrics", "containerPort": port} in ports
    monitor = yaml.safe_load(POD_MONITOR.read_text(encoding="utf-8"))
    assert monitor["kind"] == "PodMonitor"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["tipgraph"]}
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


# -- a real Serve app: Ray's metrics endpoint and the replicas' log files -------------------------
USER_ID = f"observed-user-{uuid.uuid4().hex[:8]}@example.com"
TASK_TITLE = f"Negotiate the Hooli acquisition {uuid.uuid4().hex[:8]}"
APP = f"observed{uuid.uuid4().hex[:6]}"
N_TIPS = 6


@dataclass
class ObservedApp:
    events: list[str]
    tips: list[dict[str, Any]]
    logs_dir: Path
    metrics_url: str
    user_key: str


@pytest.fixture(scope="module")
def observed_app(
    serve_port: int, ray_metrics_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ObservedApp]:
    """One app of the real graph: healthy shadows, an LLM that is down (so fallbacks and an
    open circuit), feedback for every tip, and a user erased at the end."""
    from ray import serve

    tmp = tmp_path_factory.mktemp("observed")
    llm_config = tmp / "llm.yaml"
    llm_config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": "tip-generator",
                        "litellm_params": {
                            "model": "ollama_chat/llama3.2:3b",
                            # Nothing listens there: every call fails at once.
                            "api_base": f"http://127.0.0.1:{free_port()}",
                        },
                    }
                ],
                "router_settings": {"num_retries": 0},
            }
        )
    )
    base = load_settings(PROJECT_ROOT / "configs" / "tipgraph.yaml")
    settings = TipgraphSettings(
        **{
            **base.model_dump(exclude={"shadows", "store", "serve", "generation", "logs"}),
            "serve": {"app_name": APP, "route_prefix": f"/{APP}", "port": serve_port},
            "store": {"url": f"sqlite:///{tmp / 'log.db'}", "spill_dir": str(tmp / "spill")},
            "shadows": [
                {"policy": {"name": "egreedy", "kind": "egreedy"}},
                {"policy": {"name": "uniform", "kind": "uniform"}},
            ],
            "generation": {
                "source": "mixed",
                "serve_from": "inline",  # every request meets the dead LLM
                "llm_config": str(llm_config),
                "prompts_dir": str(PROJECT_ROOT / "configs" / "prompts"),
                # Long enough that a refused connection is always an llm_error, even when
                # LiteLLM's first call in the replica is slow.
                "timeout_s": 10,
                "breaker": {"failure_threshold": 3, "reset_after_s": 600},
            },
            "logs": {"dir": str(tmp / "logs"), "flush_interval_s": 0.5},
            "metrics": {"export_port": ray_metrics_port, "sample_interval_s": 0.5},
        }
    )
    serve.run(build_graph(settings), name=APP, route_prefix=f"/{APP}")
    try:
        tips = []
        with httpx.Client(
            base_url=f"http://127.0.0.1:{serve_port}/{APP}", timeout=60, headers=AUTH_HEADERS
        ) as client:
            body = tip_body(
                user_id=USER_ID, tasks=[task("hooli", TASK_TITLE, priority=4), task("t2")]
            )
            for i in range(N_TIPS):
                response = client.post("/v1/tips", json=body)
                assert response.status_code == 200, response.text
                tips.append(response.json())
                reaction = "done" if i % 2 == 0 else "snooze"
                event_id = response.json()["event_id"]
                feedback = client.post(
                    "/v1/feedback", json={"event_id": event_id, "reaction": reaction}
                )
                assert feedback.status_code == 200, feedback.text
            assert client.delete(f"/v1/users/{USER_ID}").status_code == 200
        yield ObservedApp(
            events=[t["event_id"] for t in tips],
            tips=tips,
            logs_dir=tmp / "logs",
            metrics_url=f"http://127.0.0.1:{ray_metrics_port}/metrics",
            user_key=pseudonymise(
                settings.privacy.user_key_secret.get_secret_value(), USER_ID, namespace="user"
            ),
        )
    finally:
        serve.delete(APP)


Sample = tuple[str, dict[str, str], float]


def scrape(url: str) -> list[Sample]:
    """This app's tipgraph samples: (series name, tags, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10).text
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        if family.name.startswith(f"{EXPORT_PREFIX}tipgraph_")
        for sample in family.samples
        if sample.labels.get("application") == APP
    ]


def total(samples: list[Sample], name: str, **tags: str) -> float:
    return sum(v for n, labels, v in samples if n == name and tags.items() <= labels.items())


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 45.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s:g} s")


@pytest.mark.e2e
def test_a_real_app_exports_every_metric_on_the_ray_metrics_port(
    observed_app: ObservedApp,
) -> None:
    samples: list[Sample] = []

    def complete() -> bool:
        # Ray exports every few seconds, and shadows score their events after a linger.
        nonlocal samples
        samples = scrape(observed_app.metrics_url)
        return all(
            total(samples, name, **tags) >= minimum
            for name, tags, minimum in (
                ("ray_tipgraph_decisions_total", {"role": "served"}, N_TIPS),
                ("ray_tipgraph_decisions_total", {"policy": "egreedy", "role": "shadow"}, N_TIPS),
                ("ray_tipgraph_decisions_total", {"policy": "uniform", "role": "shadow"}, N_TIPS),
                ("ray_tipgraph_rewards_total", {}, N_TIPS),
                ("ray_tipgraph_stage_latency_ms_count", {"stage": "total"}, N_TIPS),
                ("ray_tipgraph_generation_breaker_state", {}, 2),
                # Each replica exports on its own clock: wait for every count asserted below.
                ("ray_tipgraph_shadow_comparisons_total", {"policy": "egreedy"}, N_TIPS),
                ("ray_tipgraph_shadow_comparisons_total", {"policy": "uniform"}, N_TIPS),
                ("ray_tipgraph_generation_fallbacks_total", {"reason": "llm_error"}, 3),
                ("ray_tipgraph_generation_fallbacks_total", {"reason": "circuit_open"}, 3),
                ("ray_tipgraph_generation_breaker_opened_total", {}, 1),
                *(
                    ("ray_tipgraph_stage_latency_ms_count", {"stage": stage}, N_TIPS)
                    for stage in ("context", "generation", "scoring")
                ),
            )
        )

    wait_for(complete, f"every metric of {APP} on the Ray metrics port")
    served = {
        (labels["policy"], labels["policy_version"], labels["deployment"])
        for name, labels, _ in samples
        if name == "ray_tipgraph_decisions_total" and labels["role"] == "served"
    }
    version = version_tag(observed_app.tips[0]["policy"]["version"])
    assert served == {("linucb", version, "ingress")}
    assert total(samples, "ray_tipgraph_decisions_total", role="served") == N_TIPS
    for policy in ("egreedy", "uniform"):
        compared = total(samples, "ray_tipgraph_shadow_comparisons_total", policy=policy)
        assert compared == N_TIPS  # every shadow pick, compared in the shadow's replica
        shadow_deployments = {
            labels["deployment"]
            for name, labels, _ in samples
            if name == "ray_tipgraph_shadow_comparisons_total" and labels["policy"] == policy
        }
        assert shadow_deployments == {"shadows"}
    for reaction, count in (("done", N_TIPS // 2), ("snooze", N_TIPS // 2)):
        assert total(samples, "ray_tipgraph_rewards_total", reaction=reaction) == count
    assert total(samples, "ray_tipgraph_reward_sum_total") == pytest.approx(N_TIPS // 2 * 1.25)
    # The LLM is down: three failures open the circuit, which then answers every request.
    assert total(samples, "ray_tipgraph_generation_fallbacks_total", reason="llm_error") == 3
    assert total(samples, "ray_tipgraph_generation_fallbacks_total", reason="circuit_open") == 3
    assert total(samples, "ray_tipgraph_generation_breaker_opened_total") == 1
    for stage in ("context", "generation", "scoring", "total"):
        count = total(samples, "ray_tipgraph_stage_latency_ms_count", stage=stage)
        assert count == N_TIPS, stage
        assert total(samples, "ray_tipgraph_stage_latency_ms_sum", stage=stage) > 0
    gauges = {
        (name, labels["deployment"])
        for name, labels, _ in samples
        if name.startswith(("ray_tipgraph_decision_log", "ray_tipgraph_feedback"))
    }
    for writer in ("ingress", "shadows"):
        for gauge in ("backlog", "spilled", "spill_bytes"):
            assert (f"ray_tipgraph_decision_log_{gauge}", writer) in gauges
    assert ("ray_tipgraph_feedback_held", "ingress") in gauges
    assert total(samples, "ray_tipgraph_decision_log_spill_bytes") == 0
    # Every /v1 request by the id of its token (conftest's, the env token), never the token.
    requests: list[Sample] = []

    def by_route() -> dict[str, float]:
        nonlocal requests
        requests = scrape(observed_app.metrics_url)
        name = "ray_tipgraph_http_requests_total"
        return {
            route: total(requests, name, token_id="env", route=route, code="200")
            for route in ("tips", "feedback", "erase")
        }

    expected = {"tips": N_TIPS, "feedback": N_TIPS, "erase": 1}
    wait_for(lambda: by_route() == expected, "every request counted by token id")
    assert TEST_API_TOKEN not in {v for _, labels, _ in requests for v in labels.values()}
    # Nothing exported but what tipgraph/metrics.py defines, and no personal data in tags.
    assert {name for name, _, _ in samples} <= EXPORTED
    for _, labels, _ in samples:
        assert not set(labels) & PERSONAL_TAGS
        assert USER_ID not in labels.values() and not set(labels.values()) & set(
            observed_app.events
        )


@pytest.mark.e2e
def test_a_real_app_logs_json_lines_with_event_ids_and_nothing_personal(
    observed_app: ObservedApp,
) -> None:
    lines: list[dict[str, Any]] = []

    def every_event_logged() -> bool:
        nonlocal lines
        lines = [
            json.loads(line)
            for path in sorted(observed_app.logs_dir.glob("*.log"))
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        logged = {line.get("event_id") for line in lines}
        return set(observed_app.events) <= logged

    wait_for(every_event_logged, "a log line for every event")
    for event_id in observed_app.events:
        about = [line for line in lines if line.get("event_id") == event_id]
        messages = {line["message"] for line in about}
        assert {"tip served", "feedback recorded"} <= messages, messages
        served = next(line for line in about if line["message"] == "tip served")
        # Joinable to Serve's access line of the same request.
        assert served["request_id"] and served["deployment"] == f"{APP}_ingress"
        assert served["application"] == APP
        access = [
            line
            for line in lines
            if line.get("request_id") == served["request_id"] and "/v1/tips" in line["message"]
        ]
        assert access, "Serve's access line for the request"
    # Each /v1 request's line names its token by id, joinable to Serve's access line.
    by_token = [line for line in lines if line.get("token_id") == "env"]
    assert len(by_token) == 2 * N_TIPS + 1
    assert all(line["request_id"] for line in by_token)
    assert {line["message"] for line in by_token} == {
        "tips 200 token_id=env",
        "feedback 200 token_id=env",
        "erase 200 token_id=env",
    }
    fallbacks = [line for line in lines if "LLM generation failed" in line["message"]]
    assert len(fallbacks) == 3 and all(
        line["event_id"] in observed_app.events for line in fallbacks
    )
    assert all(line["levelname"] == "WARNING" for line in fallbacks)

    text = "\n".join(
        path.read_text(encoding="utf-8") for path in sorted(observed_app.logs_dir.glob("*"))
    )
    contents = {tip["tip"]["content"] for tip in observed_app.tips}
    for needle in (USER_ID, observed_app.user_key, TASK_TITLE, "hooli", TEST_API_TOKEN, *contents):
        assert needle not in text
    assert "{user_id}" in text  # the erasure's access line names the route, not the user
