"""Prometheus metrics: each one defined once here (name, help, tags), recorded through a sink.

Plain-Python code (TipService, the generator, the shadow path) records through
:class:`Metrics` and never imports Ray.  A Serve replica gives it a :class:`RaySink`
(``ray.serve.metrics``), tests a recording sink, everything else the no-op default.

Ray exports every metric on each node's metrics port (``/metrics``, see
``metrics.export_port``) as ``ray_<name>``: counters gain ``_total``, histograms
``_bucket``, ``_sum`` and ``_count`` (:attr:`MetricSpec.exported`).  Serve adds the
``application``, ``deployment`` and ``replica`` tags to each series.

A tag value never holds a user id, task text or an event id: every distinct value is a
new time series kept for the retention period, and what Prometheus stores is not erased
with a user.  Policy versions are tagged without their update count (:func:`version_tag`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tipgraph.contracts import StageLatency
from tipgraph.settings import MetricsSettings
from tipgraph.store.records import ExpiredRows, PolicyRole, PolicyScoresRecord

Kind = Literal["counter", "gauge", "histogram"]
EXPORT_PREFIX = "ray_"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> tuple[str, ...]:
        """The series names a Prometheus scrape shows for this metric."""
        base = EXPORT_PREFIX + self.name
        if self.kind == "counter":
            return (f"{base}_total",)
        if self.kind == "histogram":
            return (f"{base}_bucket", f"{base}_sum", f"{base}_count")
        return (base,)


LATENCY_BUCKETS_MS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)
STAGES = ("context", "generation", "scoring", "total")
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}

DECISIONS = MetricSpec(
    "tipgraph_decisions",
    "counter",
    "Decisions, by the policy that made them: role=served for the tip shown, "
    "role=shadow for a shadow's pick of the same candidates.",
    ("policy", "policy_version", "role"),
)
REWARDS = MetricSpec(
    "tipgraph_rewards",
    "counter",
    "Feedback recorded for a served decision, by its policy and the reaction.",
    ("policy", "policy_version", "reaction"),
)
REWARD_SUM = MetricSpec(
    "tipgraph_reward_sum",
    "counter",
    "Sum of the rewards of recorded feedback, by the served policy; mean reward = "
    "rate(reward_sum) / rate(rewards). A counter only rises: rewards below 0 (a negative "
    "rewards.min_reward) are not added.",
    ("policy", "policy_version"),
)
DEFAULT_REWARDS = MetricSpec(
    "tipgraph_default_rewards",
    "counter",
    "Decisions that got the default reward: no feedback within learning.reward_wait_s.",
)
SHADOW_COMPARISONS = MetricSpec(
    "tipgraph_shadow_comparisons",
    "counter",
    "Shadow picks compared with the served pick of the same event; agreed=true when "
    "they are the same candidate.",
    ("policy", "agreed"),
)
SHADOW_FAILURES = MetricSpec(
    "tipgraph_shadow_failures",
    "counter",
    "Events a shadow policy failed to score (error, timeout or lost call).",
    ("policy",),
)
GENERATION_FALLBACKS = MetricSpec(
    "tipgraph_generation_fallbacks",
    "counter",
    "Requests served task tips instead of LLM tips, by reason: pool_miss (no pool entry "
    "yet: a refill is queued); inline only: circuit_open, timeout, llm_error, "
    "malformed_answer, no_valid_tips.",
    ("reason",),
)
BREAKER_STATE = MetricSpec(
    "tipgraph_generation_breaker_state",
    "gauge",
    "The tip-generator circuit breaker of a generation replica (of a pool replica when "
    "serving from the candidate pool): 0 closed, 1 half-open, 2 open.",
)
BREAKER_OPENED = MetricSpec(
    "tipgraph_generation_breaker_opened",
    "counter",
    "Times the tip-generator circuit breaker of a generation or pool replica opened.",
)
STAGE_LATENCY = MetricSpec(
    "tipgraph_stage_latency_ms",
    "histogram",
    "Latency of each stage of a served tip as the ingress saw it, in milliseconds "
    "(stage=total is the whole request).",
    ("stage",),
    LATENCY_BUCKETS_MS,
)
DECISION_LOG_BACKLOG = MetricSpec(
    "tipgraph_decision_log_backlog",
    "gauge",
    "Rows a replica's decision-log writer accepted but has not written to the database yet.",
)
DECISION_LOG_SPILLED = MetricSpec(
    "tipgraph_decision_log_spilled",
    "gauge",
    "Rows waiting only in a replica's write-ahead log (memory is full: a long outage).",
)
DECISION_LOG_SPILL_BYTES = MetricSpec(
    "tipgraph_decision_log_spill_bytes",
    "gauge",
    "Bytes of a replica's write-ahead-log segments on disk; 0 when there are none.",
)
DECISION_LOG_OLDEST_UNWRITTEN = MetricSpec(
    "tipgraph_decision_log_oldest_unwritten_seconds",
    "gauge",
    "Age of the oldest row a replica's writer has not written yet; 0 when none waits.",
)
DECISION_LOG_DEAD_LETTERS = MetricSpec(
    "tipgraph_decision_log_dead_letters",
    "counter",
    "Rows the database refused for good, moved to the dead-letter file instead of retried.",
)
DECISION_LOG_REPLAYED = MetricSpec(
    "tipgraph_decision_log_replayed",
    "counter",
    "Rows replayed from the write-ahead log of a writer that died.",
)
FEEDBACK_HELD = MetricSpec(
    "tipgraph_feedback_held",
    "gauge",
    "Feedback an ingress replica holds until its decision can be read.",
)
POOL_LOOKUPS = MetricSpec(
    "tipgraph_pool_lookups",
    "counter",
    "Candidate-pool lookups on the request path, by result: hit or miss.",
    ("result",),
)
POOL_REFILLS = MetricSpec(
    "tipgraph_pool_refills",
    "counter",
    "Background refills of the candidate pool, by outcome: filled, deduplicated (the key "
    "was already queued or claimed), queue_full, not_sent (a generation replica could not "
    "hand it to the pool deployment: unreachable, or too many calls out), or the "
    "generation failure's reason.",
    ("outcome",),
)
POOL_TIPS_REJECTED = MetricSpec(
    "tipgraph_pool_tips_rejected",
    "counter",
    "Generated tips kept out of the pool, by reason: unsafe, low_score, no_verdict "
    "(judge), unjudged (judge down, failing closed), near_duplicate (embedder).",
    ("reason",),
)
POOL_AIDS_FAILED = MetricSpec(
    "tipgraph_pool_aids_failed",
    "counter",
    "Refills whose judge or embedder call failed (alias: judge or embedder); the refill "
    "goes on as generation.judge.on_failure says, or without embeddings.",
    ("alias",),
)
HTTP_REQUESTS = MetricSpec(
    "tipgraph_http_requests",
    "counter",
    "Requests under /v1, by the id of the token that made them (none: no valid token), "
    "the route's scope (tips, feedback, erase, admin) and the HTTP status.",
    ("token_id", "route", "code"),
)
TOKEN_RELOADS = MetricSpec(
    "tipgraph_token_reloads",
    "counter",
    "Changes of auth.tokens_file an ingress replica saw, by outcome: reloaded, or failed "
    "(unreadable or invalid: the tokens loaded before stay valid).",
    ("outcome",),
)
GUARDRAIL_CROSSED = MetricSpec(
    "tipgraph_guardrail_crossed",
    "gauge",
    "1 while the guardrail (experiment.guardrails) is crossed with confidence over its "
    "window, 0 otherwise or when it has too few decisions to judge.",
    ("guardrail",),
)
CANDIDATES_INELIGIBLE = MetricSpec(
    "tipgraph_candidates_ineligible",
    "counter",
    "Candidates the eligibility rules removed before scoring, by rule: tip_cooldown, "
    "kind_cooldown, daily_cap; none_eligible counts decisions where every candidate was "
    "ineligible and all were kept.",
    ("rule",),
)
RETENTION_DELETED = MetricSpec(
    "tipgraph_retention_deleted",
    "counter",
    "Rows the retention deleted (retention.days), by kind: decisions (with their "
    "candidates), feedback, policy_runs (every policy's run), embeddings.",
    ("rows",),
)
BUS_REACTIONS = MetricSpec(
    "tipgraph_bus_reactions",
    "counter",
    "Reactions a bus replica pulled from the bus, by outcome: applied, duplicate "
    "(stored already, the same reaction), dead_lettered, retried (decision not readable "
    "yet, or the store away: delivered again after bus.retry_delay_s).",
    ("outcome",),
)
BUS_DEAD_LETTERS = MetricSpec(
    "tipgraph_bus_dead_letters",
    "counter",
    "Reactions sent to bus.dead_letter_subject, by reason: undecodable, invalid, "
    "unknown_event (never issued, erased, or missing for bus.decision_wait_s), conflict "
    "(the event has another reaction), failed (an unexpected error, bus.max_failures times).",
    ("reason",),
)
BUS_LAG = MetricSpec(
    "tipgraph_bus_lag",
    "gauge",
    "Reactions published and not yet acked by the durable consumer (waiting, in flight or "
    "retried), as a bus replica last read it; every replica reports the same lag.",
    (),
)
BUS_DECISIONS_PUBLISHED = MetricSpec(
    "tipgraph_bus_decisions_published",
    "counter",
    "Decision events a bus replica published from the outbox and JetStream acknowledged "
    "(bus.decision_events); at least once, so a republish after a crash counts again.",
    (),
)

METRICS = (
    DECISIONS,
    REWARDS,
    REWARD_SUM,
    DEFAULT_REWARDS,
    SHADOW_COMPARISONS,
    SHADOW_FAILURES,
    GENERATION_FALLBACKS,
    BREAKER_STATE,
    BREAKER_OPENED,
    STAGE_LATENCY,
    DECISION_LOG_BACKLOG,
    DECISION_LOG_SPILLED,
    DECISION_LOG_SPILL_BYTES,
    DECISION_LOG_OLDEST_UNWRITTEN,
    DECISION_LOG_DEAD_LETTERS,
    DECISION_LOG_REPLAYED,
    FEEDBACK_HELD,
    POOL_LOOKUPS,
    POOL_REFILLS,
    POOL_TIPS_REJECTED,
    POOL_AIDS_FAILED,
    HTTP_REQUESTS,
    TOKEN_RELOADS,
    RETENTION_DELETED,
    CANDIDATES_INELIGIBLE,
    GUARDRAIL_CROSSED,
    BUS_REACTIONS,
    BUS_DEAD_LETTERS,
    BUS_LAG,
    BUS_DECISIONS_PUBLISHED,
)
"""Every metric tipgraph records."""


def version_tag(policy_version: str) -> str:
    """A policy version without its update count: ``linucb-1a2b3c4d.1742`` -> ``linucb-1a2b3c4d``.

    The count grows with every learned reward; as a tag value it would start a new time
    series per reward.  What is left changes only with the hyperparameters or a promotion.
    """
    head, dot, count = policy_version.rpartition(".")
    return head if dot and count.isdigit() else policy_version


class MetricSink(Protocol):
    def inc(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None: ...

    def set(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None: ...

    def observe(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None: ...


class NullSink:
    """Records nothing: the default outside a Serve replica."""

    def inc(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        pass

    def set(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        pass

    def observe(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        pass


class RaySink:
    """Records with ``ray.serve.metrics``; build it inside a replica, so Serve tags each
    series with its application, deployment and replica."""

    def __init__(self) -> None:
        # Imported here: plain-Python users of this module never load Ray.
        from ray.serve import metrics as serve_metrics

        self._instruments: dict[str, Any] = {}
        for spec in METRICS:
            # Ray annotates tag_keys as a 1-tuple (Tuple[str]); it takes any length.
            tags: Any = spec.tags
            instrument: Any
            if spec.kind == "counter":
                instrument = serve_metrics.Counter(spec.name, spec.help, tags)
            elif spec.kind == "gauge":
                instrument = serve_metrics.Gauge(spec.name, spec.help, tags)
            else:
                instrument = serve_metrics.Histogram(spec.name, spec.help, list(spec.buckets), tags)
            self._instruments[spec.name] = instrument

    def inc(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._instruments[metric.name].inc(value, tags)

    def set(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._instruments[metric.name].set(value, tags)

    def observe(self, metric: MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._instruments[metric.name].observe(value, tags)


class BreakerView(Protocol):
    @property
    def state(self) -> str: ...

    @property
    def times_opened(self) -> int: ...


class DecisionLogView(Protocol):
    @property
    def backlog(self) -> int: ...

    @property
    def spilled(self) -> int: ...

    @property
    def spill_bytes(self) -> int: ...

    def oldest_unwritten_s(self) -> float: ...

    @property
    def dead_lettered(self) -> int: ...

    @property
    def replayed(self) -> int: ...


class Metrics:
    """What tipgraph counts, in its own terms; each method records the metrics above."""

    def __init__(self, sink: MetricSink | None = None) -> None:
        self._sink: MetricSink = sink if sink is not None else NullSink()
        self._totals_seen: dict[str, float] = {}

    def decision(self, policy: str, policy_version: str, role: PolicyRole) -> None:
        tags = {"policy": policy, "policy_version": version_tag(policy_version), "role": role}
        self._sink.inc(DECISIONS, 1, tags)

    def stage_latency(self, latency: StageLatency) -> None:
        for stage in STAGES:
            self._sink.observe(STAGE_LATENCY, getattr(latency, stage), {"stage": stage})

    def reward(self, policy: str, policy_version: str, reaction: str, reward: float) -> None:
        tags = {"policy": policy, "policy_version": version_tag(policy_version)}
        self._sink.inc(REWARDS, 1, {**tags, "reaction": reaction})
        # A counter, not a histogram: Ray exports a histogram's _sum from bucket midpoints.
        if reward > 0:
            self._sink.inc(REWARD_SUM, reward, tags)

    def default_rewards(self, count: int) -> None:
        if count > 0:  # a Prometheus counter only moves up
            self._sink.inc(DEFAULT_REWARDS, count, {})

    def shadow_run(self, run: PolicyScoresRecord, served_candidate_id: str) -> None:
        """A shadow's answer for one event: a shadow decision, compared with the served
        pick.  A failed run counts nowhere here: whoever sees a failure reports it
        (:meth:`shadow_failure`), once."""
        if run.error is not None or run.chosen_candidate_id is None:
            return
        self.decision(run.policy_name, run.policy_version, "shadow")
        agreed = "true" if run.chosen_candidate_id == served_candidate_id else "false"
        self._sink.inc(SHADOW_COMPARISONS, 1, {"policy": run.policy_name, "agreed": agreed})

    def shadow_failure(self, policy: str) -> None:
        self._sink.inc(SHADOW_FAILURES, 1, {"policy": policy})

    def generation_fallback(self, reason: str) -> None:
        self._sink.inc(GENERATION_FALLBACKS, 1, {"reason": reason})

    def pool_lookup(self, result: str) -> None:
        self._sink.inc(POOL_LOOKUPS, 1, {"result": result})

    def pool_refill(self, outcome: str, count: int = 1) -> None:
        self._sink.inc(POOL_REFILLS, count, {"outcome": outcome})

    def pool_tips_rejected(self, reason: str, count: int) -> None:
        if count:
            self._sink.inc(POOL_TIPS_REJECTED, count, {"reason": reason})

    def pool_aid_failed(self, alias: str) -> None:
        self._sink.inc(POOL_AIDS_FAILED, 1, {"alias": alias})

    def http_request(self, token_id: str, route: str, code: int) -> None:
        self._sink.inc(HTTP_REQUESTS, 1, {"token_id": token_id, "route": route, "code": str(code)})

    def token_reload(self, outcome: str) -> None:
        self._sink.inc(TOKEN_RELOADS, 1, {"outcome": outcome})

    def guardrail(self, name: str, crossed: bool) -> None:
        self._sink.set(GUARDRAIL_CROSSED, 1.0 if crossed else 0.0, {"guardrail": name})

    def ineligible(self, removed: dict[str, int]) -> None:
        for rule, count in removed.items():
            if count:
                self._sink.inc(CANDIDATES_INELIGIBLE, count, {"rule": rule})

    def retention_deleted(self, expired: ExpiredRows) -> None:
        for rows in ("decisions", "feedback", "policy_runs", "embeddings"):
            count = getattr(expired, rows)
            if count:
                self._sink.inc(RETENTION_DELETED, count, {"rows": rows})

    def bus_reaction(self, outcome: str) -> None:
        self._sink.inc(BUS_REACTIONS, 1, {"outcome": outcome})

    def bus_dead_letter(self, reason: str) -> None:
        self._sink.inc(BUS_DEAD_LETTERS, 1, {"reason": reason})

    def bus_decisions_published(self, count: int) -> None:
        self._sink.inc(BUS_DECISIONS_PUBLISHED, count, {})

    def sample_bus_lag(self, lag: int) -> None:
        self._sink.set(BUS_LAG, lag, {})

    def _count_to(self, spec: MetricSpec, total: float) -> None:
        """Move the counter ``spec`` up to ``total``, a running total kept elsewhere and
        sampled: only the growth since the last sample is added (a counter never falls)."""
        growth = total - self._totals_seen.get(spec.name, 0)
        if growth > 0:
            self._sink.inc(spec, growth, {})
            self._totals_seen[spec.name] = total

    def sample_breaker(self, breaker: BreakerView) -> None:
        self._sink.set(BREAKER_STATE, BREAKER_STATES[breaker.state], {})
        self._count_to(BREAKER_OPENED, breaker.times_opened)

    def sample_decision_log(self, log: DecisionLogView) -> None:
        self._sink.set(DECISION_LOG_BACKLOG, log.backlog, {})
        self._sink.set(DECISION_LOG_SPILLED, log.spilled, {})
        self._sink.set(DECISION_LOG_SPILL_BYTES, log.spill_bytes, {})
        self._sink.set(DECISION_LOG_OLDEST_UNWRITTEN, log.oldest_unwritten_s(), {})
        self._count_to(DECISION_LOG_DEAD_LETTERS, log.dead_lettered)
        self._count_to(DECISION_LOG_REPLAYED, log.replayed)

    def sample_feedback_held(self, held: int) -> None:
        self._sink.set(FEEDBACK_HELD, held, {})


def replica_metrics(settings: MetricsSettings) -> Metrics:
    """The metrics of a Serve replica: Ray-backed, unless ``metrics.enabled`` is off."""
    return Metrics(RaySink()) if settings.enabled else Metrics()
