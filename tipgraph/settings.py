"""One source of truth for configuration: ``configs/tipgraph.yaml`` + ``TIPGRAPH_*`` env vars.

Everything that runs (the Serve graph, ``serve_config.yaml``, the CLI, the simulator's
defaults) reads a :class:`TipgraphSettings`.  Environment variables override the YAML file,
nested with ``__`` (``TIPGRAPH_STORE__URL=postgresql://...``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_PATH = Path("configs/tipgraph.yaml")
CONFIG_ENV_VAR = "TIPGRAPH_CONFIG"

Reaction = Literal["done", "snooze", "dismiss"]
TipKind = Literal["focus", "overdue", "due_today", "batch", "plan_day", "break_down"]
PolicyKind = Literal["linucb", "lints", "egreedy", "softmax", "squarecb", "uniform", "baseline"]
FeatureGroup = Literal["kind", "time", "workload", "history", "task", "quality", "embedding"]
"""Blocks of the joint feature vector a policy may be restricted to (tipgraph.features)."""
SHADOWS_DEPLOYMENT = "shadows"
"""The one deployment that runs every shadow policy (in the graph when there are shadows)."""
STAGES = ("ingress", "context", "generation", "scoring", SHADOWS_DEPLOYMENT)
POOL_DEPLOYMENT = "pool"
"""The refill workers' deployment, in the graph when ``generation.serve_from`` is pool."""
ITEM_STAGES = ("context", "generation", POOL_DEPLOYMENT)
"""The stages whose replicas report the items inside them (autoscaling.signal: items)."""
BUS_DEPLOYMENT = "bus"
"""The event bus's deployment: it consumes reactions (``bus.reactions``) and publishes
decision events (``bus.decision_events.enabled``); in the graph when either is on."""


class _Strict(BaseModel):
    # A misspelled key in the YAML must fail loudly, not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServeSettings(_Strict):
    app_name: str = "tipgraph"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode",
        description="Where Serve runs HTTP proxies; HeadOnly when every node shares one "
        "machine's ports (the local rehearsal)",
    )


class StoreSettings(_Strict):
    url: str = Field(
        "sqlite:///var/tipgraph.db",
        description="sqlite:///relative/or/absolute/path.db or postgresql://user@host:port/db",
    )
    pg_schema: str | None = Field(
        None, description="Postgres schema for all tables (created if missing); None = public"
    )
    migrate: bool = Field(
        True,
        description="Apply pending schema migrations on open; false: only check that the "
        "schema is current, for a role that may only read (the tuning job)",
    )
    pool_min_size: int = Field(1, ge=0)
    pool_max_size: int = Field(4, ge=1)
    flush_interval_s: float = Field(
        0.05, gt=0, description="How long the decision-log writer waits to batch rows"
    )
    batch_size: int = Field(256, ge=1)
    timeout_s: float = Field(
        3.0,
        gt=0,
        description="Longest wait for a pooled Postgres connection: during an outage a "
        "request degrades (empty history, held feedback) after this, never hangs",
    )
    max_buffered_rows: int = Field(
        10_000, ge=1, description="Rows the writer keeps in memory; more wait in spill_dir"
    )
    spill_dir: str = Field(
        "var/spill",
        description="The writers' write-ahead logs and dead-letter file; keep it on a volume "
        "that outlives the process (replicas replay the logs of writers that died)",
    )
    durability: Literal["buffered", "durable"] = Field(
        "buffered",
        description="buffered: a decision is answered from memory and written within "
        "flush_interval_s (a SIGKILL loses that window); durable: it is fsynced to the local "
        "log before the answer (a SIGKILL loses nothing answered)",
    )
    max_spill_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Write-ahead log on disk per writer past which /v1/tips answers 503 "
        "instead of accepting rows it could lose",
    )
    max_unwritten_age_s: float = Field(
        60.0,
        gt=0,
        description="/readyz is 503 while a row older than this waits to be written",
    )
    replay_interval_s: float = Field(
        30.0, gt=0, description="How often a writer looks for dead writers' logs to replay"
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError(f"store.url must start with sqlite:// or postgresql://, got {url!r}")
        return url


class RewardSettings(_Strict):
    """Reaction -> reward. ``value`` in feedback overrides it within [min_reward, max_reward]."""

    done: float = 1.0
    snooze: float = 0.25
    dismiss: float = 0.0
    min_reward: float = 0.0
    max_reward: float = 1.0

    def reward_for(self, reaction: Reaction) -> float:
        return float(getattr(self, reaction))

    @model_validator(mode="after")
    def _in_range(self) -> RewardSettings:
        for reaction in ("done", "snooze", "dismiss"):
            value = getattr(self, reaction)
            if not self.min_reward <= value <= self.max_reward:
                raise ValueError(
                    f"rewards.{reaction}={value} is outside [{self.min_reward}, {self.max_reward}]"
                )
        return self


class LearningSettings(_Strict):
    """When feedback counts, what silence is worth, and how replicas share what they learn."""

    reward_wait_s: float = Field(
        3600.0,
        gt=0,
        description="Feedback later than this after the decision is stored, not learned",
    )
    default_reward: float | None = Field(
        0.0, description="Learned for a decision with no feedback within the wait; None = off"
    )
    max_held_feedback: int = Field(
        10_000,
        ge=1,
        description="Feedback waiting for its decision (all replicas together) past which "
        "more is refused with 503",
    )
    default_reward_check_s: float = Field(
        10.0, gt=0, description="How often the ingress applies default rewards"
    )
    sync_interval_s: float = Field(
        1.0, gt=0, description="How often each policy replica applies rewards others learned"
    )


class PromptShare(_Strict):
    """One prompt template in the A/B split and its share of the traffic."""

    template: str = Field(..., pattern=r"^[a-z0-9_\-]+$", description="configs/prompts/<name>.md")
    share: float = Field(1.0, gt=0)


class BreakerSettings(_Strict):
    failure_threshold: int = Field(
        3, ge=1, description="Consecutive LLM failures that open the circuit"
    )
    reset_after_s: float = Field(
        30.0, gt=0, description="How long the circuit stays open before one trial call"
    )


class AutoscalingSettings(_Strict):
    signal: Literal["requests", "items", "lag"] = Field(
        "requests",
        description="What target_ongoing_requests counts. requests: Serve's ongoing "
        "requests, where a batched hop's batch is one (CPU-light stages); items: the "
        "requests inside the batches, which the replica reports "
        "(tipgraph.autoscaling; stages that wait on the LLM or the store); lag: the "
        "reactions waiting in the bus's durable consumer (the bus deployment only)",
    )
    min_replicas: int = Field(1, ge=0)
    initial_replicas: int | None = None
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(
        30.0, gt=0, description="Serve averages the load over this window before deciding"
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas={self.min_replicas} exceeds max_replicas={self.max_replicas}"
            )
        return self


class DeploymentSettings(_Strict):
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)
    autoscaling: AutoscalingSettings = AutoscalingSettings()


class PoolSettings(_Strict):
    """The candidate pool: LLM tips made ahead of need, per user and task set."""

    ttl_s: float = Field(21600.0, gt=0, description="An entry expires this long after it was made")
    refresh_after_serves: int = Field(
        5, ge=1, description="Generate an entry again once it served this many decisions"
    )
    max_tips: int = Field(8, ge=1, le=50, description="Tips kept per entry (per user and prompt)")
    max_entries: int = Field(
        100_000, ge=1, description="Entries kept in total; the oldest go first beyond it"
    )
    queue_size: int = Field(
        256, ge=1, description="Refills waiting per pool replica; beyond it a miss waits"
    )
    workers: int = Field(4, ge=1, le=64, description="Refills running at once per pool replica")
    generation_timeout_s: float = Field(
        30.0, gt=0, description="Budget of one refill's call to tip-generator (off the hot path)"
    )
    claim_timeout_s: float = Field(
        120.0, gt=0, description="A refill claimed by a replica that died is taken over after this"
    )
    cleanup_interval_s: float = Field(60.0, gt=0, description="How often expired entries go")
    nice: int = Field(
        4,
        ge=0,
        le=19,
        description="Added to the pool replicas' niceness, like nice -n (Ray starts every "
        "replica at 15, 19 is the lowest priority): on a node shared with the request path, "
        "refills get less of the CPU",
    )
    deployment: DeploymentSettings = Field(
        DeploymentSettings(
            num_cpus=0.1,
            max_ongoing_requests=64,
            autoscaling=AutoscalingSettings(
                signal="items", min_replicas=1, max_replicas=2, target_ongoing_requests=32
            ),
        ),
        description="The pool deployment, where refills run off the request path; "
        "signal items counts the refills queued and running in a replica",
    )


class DecisionEventSettings(_Strict):
    """Each stored decision published to the bus (tipgraph.events.v1.DecisionEvent: no user
    id, no task text), for downstream feature pipelines."""

    enabled: bool = Field(
        False,
        description="Write each decision's event to the outbox in the decision's own "
        "transaction; the bus deployment publishes it and then deletes it (at least once)",
    )
    stream: str = Field("TIPGRAPH_DECISIONS", pattern=r"^[A-Za-z0-9_-]+$")
    subject: str = "tipgraph.decisions.v1"
    duplicate_window_s: float = Field(
        600.0,
        gt=0,
        description="JetStream drops an event published again within this window (its "
        "message id is the event id): a republish after a crash reaches readers once",
    )
    interval_s: float = Field(
        1.0, gt=0, description="How often an idle bus replica looks in the outbox"
    )
    batch: int = Field(500, ge=1, le=10_000, description="Events published per look at most")


class BusSettings(_Strict):
    """NATS JetStream: reactions in (a durable pull consumer shared by the bus replicas),
    poison messages out to a dead-letter subject, decision events out when enabled."""

    url: str = Field("nats://127.0.0.1:4222", description="The NATS server (nats://host:port)")
    reactions: bool = Field(
        False,
        description="Apply reactions from the stream through the same path as POST "
        "/v1/feedback, in the bus deployment",
    )
    stream: str = Field("TIPGRAPH_REACTIONS", pattern=r"^[A-Za-z0-9_-]+$")
    subject: str = Field("tipgraph.reactions.v1", description="Where reactions are published")
    durable: str = Field(
        "tipgraph-reactions",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="The durable consumer every bus replica pulls from",
    )
    dead_letter_stream: str = Field("TIPGRAPH_DEAD_LETTERS", pattern=r"^[A-Za-z0-9_-]+$")
    dead_letter_subject: str = Field(
        "tipgraph.dead_letters.reactions.v1",
        description="Where a reaction that cannot be applied goes, with its reason in the "
        "Tipgraph-Reason header (undecodable, invalid, unknown_event, conflict, failed)",
    )
    create_streams: bool = Field(
        True,
        description="Create the streams and the durable consumer at start when they are "
        "missing (an existing one is left as it is: ops may have tuned it)",
    )
    max_age_days: float = Field(
        7.0, gt=0, description="How long the reactions stream keeps a message (created here)"
    )
    fetch_batch: int = Field(64, ge=1, le=1000, description="Messages per pull")
    ack_wait_s: float = Field(
        30.0,
        gt=0,
        description="A message not acked this long after delivery (its replica died) is "
        "delivered again",
    )
    retry_delay_s: float = Field(
        1.0,
        gt=0,
        description="Delay before a reaction whose decision is not readable is retried; it "
        "doubles with each delivery, up to 30 s",
    )
    decision_wait_s: float = Field(
        900.0,
        gt=0,
        description="A reaction whose decision (an id tipgraph issued) the store still says "
        "is missing this long after a bus replica first saw it missing is dead-lettered as "
        "unknown_event. The clock starts only when the store answers: an outage "
        "dead-letters nothing",
    )
    max_failures: int = Field(
        50,
        ge=2,
        description="A reaction that fails with an error tipgraph did not expect this many "
        "times in a bus replica is dead-lettered as failed (a decision not stored yet or the "
        "store away are expected: they never count)",
    )
    lag_interval_s: float = Field(
        1.0, gt=0, description="How often a replica reads the consumer's lag"
    )
    decision_events: DecisionEventSettings = DecisionEventSettings()
    deployment: DeploymentSettings = Field(
        DeploymentSettings(
            num_cpus=0.1,
            max_ongoing_requests=8,
            autoscaling=AutoscalingSettings(
                signal="lag", min_replicas=1, max_replicas=2, target_ongoing_requests=500
            ),
        ),
        description="The bus deployment; signal lag scales it on the reactions waiting in "
        "the durable consumer (target_ongoing_requests of them per replica)",
    )

    @property
    def deployed(self) -> bool:
        """Whether the graph has the bus deployment."""
        return self.reactions or self.decision_events.enabled

    @model_validator(mode="after")
    def _one_subject_each(self) -> BusSettings:
        subjects = [self.subject, self.dead_letter_subject, self.decision_events.subject]
        if len(set(subjects)) != len(subjects):
            raise ValueError(
                "bus.subject, bus.dead_letter_subject and bus.decision_events.subject must "
                f"differ: {subjects}"
            )
        if self.deployment.autoscaling.signal == "items":
            raise ValueError(
                "bus.deployment.autoscaling.signal 'items': the bus replicas report the "
                "reactions' lag; use 'lag' or 'requests'"
            )
        if self.deployment.autoscaling.min_replicas < 1:
            raise ValueError(
                "bus.deployment.autoscaling.min_replicas must be >= 1: the lag that scales "
                "the bus deployment is read by its replicas"
            )
        return self


class JudgeSettings(_Strict):
    """The ``judge`` alias screens every generated tip before it can be served."""

    enabled: bool = True
    model_alias: str = "judge"
    prompt: str = Field(
        "judge_v1", pattern=r"^[a-z0-9_\-]+$", description="configs/prompts/<name>.md"
    )
    min_score: float = Field(
        0.5, ge=0, le=1, description="Tips scored below this (mean of relevance, actionability) go"
    )
    on_failure: Literal["open", "closed"] = Field(
        "open",
        description="Judge down or slow: open serves the tips unjudged (marked), closed keeps "
        "them out of the pool",
    )
    timeout_s: float = Field(20.0, gt=0)


class EmbedderSettings(_Strict):
    """The ``embedder`` alias embeds every candidate tip, off the hot path."""

    enabled: bool = True
    model_alias: str = "embedder"
    timeout_s: float = Field(10.0, gt=0)
    duplicate_cosine: float = Field(
        0.92, gt=0, le=1, description="Two tips of one pool entry closer than this: one goes"
    )


class GenerationSettings(_Strict):
    """Where candidate tips come from; see docs/generation.md."""

    source: Literal["tasks", "llm", "mixed"] = "tasks"
    serve_from: Literal["pool", "inline"] = Field(
        "pool",
        description="llm/mixed: serve LLM tips made ahead of need (pool), or call the LLM on "
        "the request path within timeout_s (inline)",
    )
    llm_config: str = Field("configs/llm.yaml", description="LiteLLM model_list file")
    prompts_dir: str = "configs/prompts"
    model_alias: str = "tip-generator"
    timeout_s: float = Field(
        2.5,
        gt=0,
        description="inline: generation answers within this, from task tips if need be",
    )
    max_llm_candidates: int = Field(6, ge=1, description="mixed/llm: LLM tips per request")
    max_task_candidates: int = Field(4, ge=0, description="mixed: task tips per request")
    max_tip_chars: int = Field(280, ge=20)
    send_task_text: bool = Field(
        False, description="Privacy: may raw task text go to the LLM? Else a redacted form"
    )
    prompts: list[PromptShare] = Field(
        default_factory=lambda: [PromptShare(template="tips_v1", share=1.0)], min_length=1
    )
    breaker: BreakerSettings = BreakerSettings()
    pool: PoolSettings = PoolSettings()
    judge: JudgeSettings = JudgeSettings()
    embedder: EmbedderSettings = EmbedderSettings()

    @property
    def pooled(self) -> bool:
        """LLM tips served from the candidate pool, refilled by the pool deployment."""
        return self.source != "tasks" and self.serve_from == "pool"


class RegistrySettings(_Strict):
    """Where tuned policies live (MLflow) and whether serving follows them."""

    tracking_uri: str = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        description="MLflow tracking + registry URI; default $MLFLOW_TRACKING_URI, else local",
    )
    model_name: str = "tip-policy"
    serve_alias: str | None = Field(
        None, description="Serve this alias (e.g. champion) instead of policy:; None = off"
    )
    check_interval_s: float = Field(
        30.0, gt=0, description="How often scoring replicas look for a new alias target"
    )


class LimitSettings(_Strict):
    max_tasks: int = Field(500, ge=1)
    max_content_chars: int = Field(2000, ge=1)
    max_labels: int = Field(20, ge=0)
    max_recent_reactions: int = Field(200, ge=0)
    max_candidates: int = Field(50, ge=1)
    default_candidates: int = Field(8, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)


class FeatureSettings(_Strict):
    history_limit: int = Field(
        200, ge=0, description="How many of the user's past reactions the context stage reads"
    )
    recency_lookback_h: float = Field(
        168,
        ge=0,
        description="How far back the context stage reads the tips a user was shown, for "
        "the kind_recency feature (older exposures count as never shown); 0 = no read "
        "unless eligibility rules need one",
    )


class _PolicyBase(_Strict):
    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]{0,39}$")


class ExplorationSettings(_PolicyBase):
    """A policy that mixes an exploration floor into its distribution."""

    epsilon: float = Field(
        0.05, ge=0, le=1, description="Exploration floor: every candidate gets >= epsilon / K"
    )


class LinearModelSettings(ExplorationSettings):
    """A policy that decides with the shared ridge model (tipgraph.policies.RidgeStats)."""

    ridge: float = Field(1.0, gt=0, description="Ridge prior lambda: A starts at lambda * I")
    refresh_every: int = Field(
        1024, ge=1, description="Exact inverse after this many Sherman-Morrison updates"
    )
    half_life_s: float | None = Field(
        None,
        gt=0,
        description="Forget: a reward's weight halves for every half_life_s it is older than "
        "the newest reward (forward decay, exact across replicas); None = remember all",
    )
    features: tuple[FeatureGroup, ...] | None = Field(
        None,
        description="Feature groups the policy learns on (None = all); the others are zeroed",
    )

    @field_validator("features")
    @classmethod
    def _some_features(
        cls, groups: tuple[FeatureGroup, ...] | None
    ) -> tuple[FeatureGroup, ...] | None:
        if groups is None:
            return None
        if not groups:
            raise ValueError("features must name at least one group, or be null for all")
        # One spelling per subset, so equal subsets hash (and version) equally.
        return tuple(sorted(set(groups)))


class LinUCBSettings(LinearModelSettings):
    kind: Literal["linucb"] = "linucb"
    alpha: float = Field(1.0, ge=0, description="linucb: width of the confidence bonus")


class LinTSSettings(LinearModelSettings):
    kind: Literal["lints"] = "lints"
    v: float = Field(0.3, gt=0, description="lints: posterior scale, theta ~ N(mean, v^2 A^-1)")
    ts_draws: int = Field(
        128, ge=1, le=100_000, description="lints: posterior draws that estimate probabilities"
    )


class EpsilonGreedySettings(LinearModelSettings):
    kind: Literal["egreedy"] = "egreedy"


class SoftmaxSettings(LinearModelSettings):
    kind: Literal["softmax"] = "softmax"
    temperature: float = Field(0.1, gt=0, description="softmax: temperature over ridge scores")


class SquareCBSettings(LinearModelSettings):
    kind: Literal["squarecb"] = "squarecb"
    gamma: float = Field(
        300.0, gt=0, description="squarecb: learning rate of the inverse-gap weighting"
    )


class BaselineSettings(ExplorationSettings):
    """The fixed order generation chose; it reads no model, so it has no model settings."""

    kind: Literal["baseline"] = "baseline"


class UniformSettings(_PolicyBase):
    """Every candidate equally likely: nothing to tune, nothing to explore with."""

    kind: Literal["uniform"] = "uniform"


PolicySettings = Annotated[
    LinUCBSettings
    | LinTSSettings
    | EpsilonGreedySettings
    | SoftmaxSettings
    | SquareCBSettings
    | UniformSettings
    | BaselineSettings,
    Field(discriminator="kind"),
]
"""One policy and its hyperparameters: the ``kind`` picks the class, and each class holds
only the hyperparameters its kind reads, so only those name (and version) the policy."""

_POLICY_SETTINGS: TypeAdapter[PolicySettings] = TypeAdapter(PolicySettings)


def parse_policy(fields: Mapping[str, Any]) -> PolicySettings:
    """The policy settings ``fields`` describe (``kind`` picks the class); a
    :class:`pydantic.ValidationError` names a missing kind or a field the kind does not have."""
    return _POLICY_SETTINGS.validate_python(dict(fields))


def policy_fields(kind: str) -> frozenset[str]:
    """The field names of ``kind``'s settings class (``name`` and ``kind`` included)."""
    cls = {c.model_fields["kind"].default: c for c in _POLICY_CLASSES}[kind]
    return frozenset(cls.model_fields)


_POLICY_CLASSES: tuple[type[_PolicyBase], ...] = (
    LinUCBSettings,
    LinTSSettings,
    EpsilonGreedySettings,
    SoftmaxSettings,
    SquareCBSettings,
    UniformSettings,
    BaselineSettings,
)


class HopSettings(_Strict):
    """How one ingress replica batches its calls to one stage (tipgraph.batching)."""

    max_batch_size: int = Field(
        64, ge=1, description="Most requests in one call to the stage; 1 turns batching off"
    )
    max_inflight_batches: int = Field(
        1,
        ge=1,
        description="Calls out to the stage at once; a request arriving while all are out "
        "waits and joins the next batch. 1 makes the largest batches (fast CPU stages); "
        "raise it for a stage that waits on I/O, like LLM generation",
    )
    linger_s: float = Field(
        0.0,
        ge=0,
        le=5,
        description="A batch that is not full leaves once its first request has waited this "
        "long; only for hops nobody waits on (shadows)",
    )


class HopsSettings(_Strict):
    """Batching of the ingress's calls to each stage; every shadow uses ``shadows``."""

    context: HopSettings = HopSettings()
    generation: HopSettings = Field(
        HopSettings(),
        description="Generation from the tasks or the candidate pool (serve_from: pool)",
    )
    llm_generation: HopSettings = Field(
        HopSettings(max_inflight_batches=64),
        description="Generation when it waits on the LLM (serve_from: inline)",
    )
    scoring: HopSettings = HopSettings()
    shadows: HopSettings = HopSettings()

    def for_generation(self, generation: GenerationSettings) -> HopSettings:
        """Task tips and the candidate pool cost a store read at most; an LLM call on the
        request path (``serve_from: inline``), seconds of waiting."""
        inline = generation.source != "tasks" and generation.serve_from == "inline"
        return self.llm_generation if inline else self.generation


class FaultSettings(_Strict):
    """Chaos knobs for a shadow: prove a slow or failing shadow never touches the response."""

    delay_s: float = Field(0.0, ge=0)
    fail: bool = False


class ShadowSettings(_Strict):
    """One shadow policy.  Every shadow runs in the one ``shadows`` deployment, whose
    replicas are set in ``deployments.shadows``."""

    policy: PolicySettings
    fault: FaultSettings = FaultSettings()

    @model_validator(mode="before")
    @classmethod
    def _no_own_deployment(cls, data: Any) -> Any:
        if isinstance(data, dict) and "deployment" in data:
            raise ValueError(
                "shadows[].deployment is gone: every shadow runs in one deployment, "
                "set in deployments.shadows"
            )
        return data


DEV_USER_KEY_SECRET = "tipgraph-dev-only-secret"
"""The public key of ``privacy.allow_dev_secret``: pseudonyms made with it can be reversed."""
MIN_SECRET_CHARS = 32


class MissingUserKeySecret(RuntimeError):
    """Nothing that pseudonymises users starts without a secret key."""


class PrivacySettings(_Strict):
    user_key_secret: SecretStr | None = Field(
        None,
        description="HMAC key that pseudonymises user ids and signs event ids, at least "
        f"{MIN_SECRET_CHARS} characters: set TIPGRAPH_PRIVACY__USER_KEY_SECRET. Required: "
        "nothing that serves starts without it, unless allow_dev_secret",
    )
    allow_dev_secret: bool = Field(
        False,
        description="Local runs only: without user_key_secret, pseudonymise with a public "
        "development key, which anyone can reverse by dictionary (`make run` sets it and "
        "says so)",
    )
    user_key_id: str = Field(
        "k1",
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="Names user_key_secret; every decision records the id of the key that "
        "made its user key (change it with the key when rotating)",
    )
    retired_user_key_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Keys rotated out, by key id: erasure also looks users up under them, "
        "and event ids they signed stay valid",
    )

    @field_validator("user_key_secret")
    @classmethod
    def _long_enough(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_CHARS:
            raise ValueError(
                f"user_key_secret has {len(secret.get_secret_value())} characters; it needs "
                f"at least {MIN_SECRET_CHARS} (e.g. `openssl rand -hex 32`)"
            )
        return secret

    @model_validator(mode="after")
    def _distinct_key_ids(self) -> PrivacySettings:
        if self.user_key_id in self.retired_user_key_secrets:
            raise ValueError(
                f"user_key_id {self.user_key_id!r} is also a retired key's id: give the new "
                "key a new id"
            )
        return self

    @property
    def uses_dev_secret(self) -> bool:
        return self.user_key_secret is None and self.allow_dev_secret

    def current_secret(self) -> str:
        """The key that pseudonymises now; :class:`MissingUserKeySecret` when there is none."""
        if self.user_key_secret is not None:
            return self.user_key_secret.get_secret_value()
        if self.allow_dev_secret:
            return DEV_USER_KEY_SECRET
        raise MissingUserKeySecret(
            "privacy.user_key_secret is not set: set TIPGRAPH_PRIVACY__USER_KEY_SECRET "
            f"({MIN_SECRET_CHARS}+ characters, e.g. `openssl rand -hex 32`; k3s: from the "
            "Secret tipgraph-app). Pseudonyms made with a public key can be reversed. For a "
            "local run only, TIPGRAPH_PRIVACY__ALLOW_DEV_SECRET=true (what `make run` sets)"
        )

    def user_key_secrets(self) -> dict[str, str]:
        """Key id -> secret, the current key first, then the retired ones."""
        retired = {k: v.get_secret_value() for k, v in self.retired_user_key_secrets.items()}
        return {self.user_key_id: self.current_secret(), **retired}

    def all_user_key_secrets(self) -> list[str]:
        """The current key first, then the retired ones."""
        return list(self.user_key_secrets().values())

    store_candidate_text: bool = Field(
        False,
        description="Persist the text of every candidate, not only of the tip shown "
        "(task-mode tips quote the user's task)",
    )
    store_tip_text: Literal["quote", "redact"] = Field(
        "quote",
        description="quote: stored task-mode tip texts keep their quote of the user's task, "
        "as served; redact: the quote is stored as [task] (the response is unchanged)",
    )


class EligibilitySettings(_Strict):
    """Which candidates may be shown at all, from what the user was shown lately
    (tipgraph/eligibility.py).  Ineligible ones are removed before scoring; if none is
    left, every candidate stays (a tip is always served) and the decision says so."""

    tip_cooldown_h: float | None = Field(
        None, gt=0, description="The same tip is not shown to a user again within this; None = off"
    )
    kind_cooldown_h: dict[TipKind, float] = Field(
        default_factory=dict,
        description="Per kind: no tip of that kind again within this many hours, e.g. "
        "{plan_day: 12}",
    )
    daily_caps: dict[TipKind, int] = Field(
        default_factory=dict,
        description="Per kind: at most this many tips of that kind per user in any 24 hours",
    )
    max_exposures: int = Field(
        200, ge=1, description="Most recent tips read per request to apply the rules"
    )

    @field_validator("kind_cooldown_h", "daily_caps")
    @classmethod
    def _positive(cls, values: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in values.items() if not v > 0}
        if bad:
            raise ValueError(f"every value must be > 0, got {bad}")
        return values

    @property
    def enabled(self) -> bool:
        return bool(self.tip_cooldown_h or self.kind_cooldown_h or self.daily_caps)

    @property
    def lookback_h(self) -> float:
        """How far back the rules look: the longest cooldown, and a day for caps."""
        spans = [self.tip_cooldown_h or 0.0, *self.kind_cooldown_h.values()]
        return max([*spans, 24.0 if self.daily_caps else 0.0])


class GuardrailSettings(_Strict):
    """A metric the bandit must not cross, checked over a recent window
    (tipgraph/guardrails.py)."""

    name: str = Field(pattern=r"^[a-z0-9_]{1,40}$")
    metric: Literal["dismiss_rate", "lift"] = Field(
        description="dismiss_rate: share of the bandit's answered decisions dismissed, "
        "crossed when its 95% lower bound is above threshold; lift: the bandit's realised "
        "reward minus the holdout's, crossed when its 95% upper bound is below threshold"
    )
    threshold: float
    window_h: float = Field(24.0, gt=0, description="The decisions of the last window_h hours")
    min_decisions: int = Field(
        100, ge=2, description="Fewer (in either group) and the guardrail is not judged"
    )
    rollback: bool = Field(
        False,
        description="tipgraph guardrails check --rollback points the champion back at the "
        "previous one when this guardrail is crossed",
    )


class ExperimentSettings(_Strict):
    """An on-policy holdout: a stable share of users served by a simple policy, so the
    bandit's lift is measured causally, not only off-policy (tipgraph/holdout.py)."""

    holdout_fraction: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Share of users (by a keyed hash of their pseudonymous key) served by "
        "holdout_policy instead of the bandit; 0 = no holdout",
    )
    holdout_policy: Literal["uniform", "baseline"] = Field(
        "uniform",
        description="uniform: every candidate equally likely; baseline: the generator's "
        "order (its first candidate), with the baseline's exploration floor",
    )
    holdout_salt: str = Field(
        "holdout-1",
        min_length=1,
        description="Keys the assignment: users stay in or out across replicas and "
        "restarts; a new salt draws a new holdout",
    )
    guardrails: list[GuardrailSettings] = Field(default_factory=list)
    guardrail_check_s: float = Field(
        60.0, gt=0, description="How often each ingress replica samples the guardrails"
    )

    @model_validator(mode="after")
    def _guardrails_can_be_judged(self) -> ExperimentSettings:
        names = [g.name for g in self.guardrails]
        if len(set(names)) != len(names):
            raise ValueError(f"guardrail names must be unique: {names}")
        if self.holdout_fraction == 0 and any(g.metric == "lift" for g in self.guardrails):
            raise ValueError("a lift guardrail needs a holdout: set holdout_fraction > 0")
        return self

    @property
    def holdout_name(self) -> str:
        """The policy name holdout decisions are logged under."""
        return f"holdout_{self.holdout_policy}"


class RetentionSettings(_Strict):
    """How long the decision log keeps what users did; learned statistics stay."""

    days: int | None = Field(
        180,
        ge=1,
        description="Decisions older than this are deleted with their candidates, scores "
        "and feedback; their rewards keep the features they trained on, as on erasure. "
        "None = keep forever",
    )
    interval_s: float = Field(
        3600.0,
        gt=0,
        description="How often each ingress replica applies the retention (also: "
        "`tipgraph retention run`)",
    )
    batch_size: int = Field(
        1000, ge=1, description="Decisions deleted per transaction, so writers wait briefly"
    )


class LogSettings(_Strict):
    """Every replica's Serve ``logging_config``, and how often its buffered lines reach disk."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Lowest level written, by Serve and by tipgraph alike"
    )
    encoding: Literal["JSON", "TEXT"] = Field(
        "JSON", description="JSON: one object per line, with request_id and event_id fields"
    )
    access_log: bool = Field(
        True,
        description="One line per request: Serve's access line, and tipgraph's line that "
        "ties the request_id to the event_id",
    )
    dir: str | None = Field(
        None, description="Where replicas write their log files; None = Ray's logs/serve/"
    )
    flush_interval_s: float = Field(
        2.0,
        gt=0,
        description="Serve buffers up to 1000 lines per replica in throughput mode; each "
        "replica writes them out at least this often",
    )


class MetricsSettings(_Strict):
    """Prometheus metrics (tipgraph/metrics.py), exported by Ray on every node."""

    enabled: bool = Field(True, description="Record tipgraph_* metrics in the replicas")
    export_port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="Ray's per-node Prometheus endpoint, http://<node>:<port>/metrics "
        "(ray start --metrics-export-port; KubeRay pods use 8080)",
    )
    sample_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often replicas sample gauges: decision-log backlog and spill, "
        "held feedback, the LLM circuit breaker",
    )


API_TOKEN_ENV = "TIPGRAPH_API_TOKEN"


class AuthSettings(_Strict):
    api_token: SecretStr | None = Field(
        default_factory=lambda: (
            SecretStr(os.environ[API_TOKEN_ENV]) if os.environ.get(API_TOKEN_ENV) else None
        ),
        description="A bearer token with every scope (id 'env'), for local runs; default "
        "$TIPGRAPH_API_TOKEN. Production uses tokens_file. The ingress refuses to start "
        "with neither.",
    )
    tokens_file: str | None = Field(
        None,
        description="YAML list of tokens, each an id, the token's sha256, its scopes (tips, "
        "feedback, erase, admin) and an optional not_after (tipgraph token new); re-read "
        "when it changes, so tokens rotate without a restart (k3s: a mounted Secret)",
    )
    reload_interval_s: float = Field(
        1.0, gt=0, description="How often the ingress checks tokens_file for a change"
    )


def _default_deployments() -> dict[str, DeploymentSettings]:
    # Shadows only score and log, off the request path: a smaller CPU share.
    return {
        stage: DeploymentSettings(num_cpus=0.1 if stage == SHADOWS_DEPLOYMENT else 0.25)
        for stage in STAGES
    }


class TipgraphSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TIPGRAPH_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    serve: ServeSettings = ServeSettings()
    store: StoreSettings = StoreSettings()
    rewards: RewardSettings = RewardSettings()
    learning: LearningSettings = LearningSettings()
    generation: GenerationSettings = GenerationSettings()
    registry: RegistrySettings = RegistrySettings()
    limits: LimitSettings = LimitSettings()
    features: FeatureSettings = FeatureSettings()
    privacy: PrivacySettings = PrivacySettings()
    retention: RetentionSettings = RetentionSettings()
    eligibility: EligibilitySettings = EligibilitySettings()
    experiment: ExperimentSettings = ExperimentSettings()
    auth: AuthSettings = Field(default_factory=AuthSettings)
    policy: PolicySettings = LinUCBSettings(name="linucb")
    shadows: list[ShadowSettings] = Field(default_factory=list)
    deployments: dict[str, DeploymentSettings] = Field(default_factory=_default_deployments)
    hops: HopsSettings = HopsSettings()
    logs: LogSettings = LogSettings()
    metrics: MetricsSettings = MetricsSettings()
    bus: BusSettings = BusSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the YAML file (passed as init kwargs), so ops can override
        # one value in a pod without editing the shared config.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _consistent(self) -> TipgraphSettings:
        missing = [stage for stage in STAGES if stage not in self.deployments]
        unknown = [name for name in self.deployments if name not in STAGES]
        if missing or unknown:
            raise ValueError(
                f"deployments must have exactly {list(STAGES)}; "
                f"missing {missing}, unknown {unknown}"
            )
        default = self.learning.default_reward
        if default is not None and not (
            self.rewards.min_reward <= default <= self.rewards.max_reward
        ):
            raise ValueError(
                f"learning.default_reward={default} is outside "
                f"[{self.rewards.min_reward}, {self.rewards.max_reward}]"
            )
        days = self.retention.days
        if days is not None and days * 86_400 <= self.learning.reward_wait_s:
            raise ValueError(
                f"retention.days={days} ends before learning.reward_wait_s="
                f"{self.learning.reward_wait_s:g}: decisions would go before their reward"
            )
        names = [self.policy.name] + [shadow.policy.name for shadow in self.shadows]
        if self.experiment.holdout_fraction > 0:
            names.append(self.experiment.holdout_name)
        if len(set(names)) != len(names):
            raise ValueError(f"policy names must be unique across served and shadows: {names}")
        scaling = {name: d.autoscaling for name, d in self.deployments.items()}
        scaling[POOL_DEPLOYMENT] = self.generation.pool.deployment.autoscaling
        wrong = [n for n, a in scaling.items() if a.signal == "items" and n not in ITEM_STAGES]
        if wrong:
            raise ValueError(
                f"autoscaling.signal 'items' of {wrong}: only {list(ITEM_STAGES)} replicas "
                "report their items (tipgraph.autoscaling); use 'requests'"
            )
        lagging = [n for n, a in scaling.items() if a.signal == "lag"]
        if lagging:
            raise ValueError(
                f"autoscaling.signal 'lag' of {lagging}: only the bus deployment "
                "(bus.deployment) reads a lag"
            )
        return self

    def masked_dump(self) -> dict[str, Any]:
        """The effective configuration with secrets masked, safe to print or log."""
        return self.model_dump(mode="json")


def _read_mapping(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def merge_overlay(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on top of ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overlay(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    path: str | os.PathLike[str] | None = None,
    overlays: Sequence[str | os.PathLike[str]] = (),
) -> TipgraphSettings:
    """Read the YAML config (``path``, else ``$TIPGRAPH_CONFIG``, else the default if present),
    then each overlay on top of it (``configs/k3s/prod.yaml`` on ``configs/tipgraph.yaml``)."""
    if path is None:
        path = os.environ.get(CONFIG_ENV_VAR) or (
            DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
        )
    data: dict[str, Any] = _read_mapping(path) if path is not None else {}
    for overlay in overlays:
        data = merge_overlay(data, _read_mapping(overlay))
    return TipgraphSettings(**data)


def resolve_paths(settings: TipgraphSettings, base: Path) -> TipgraphSettings:
    """Make relative file paths absolute (SQLite file, LLM config, prompts, tokens), so every Ray
    worker opens the same files whatever its working directory."""

    def absolute(path: str) -> str:
        return path if Path(path).is_absolute() else str((base / path).resolve())

    generation = settings.generation.model_copy(
        update={
            "llm_config": absolute(settings.generation.llm_config),
            "prompts_dir": absolute(settings.generation.prompts_dir),
        }
    )
    settings = settings.model_copy(update={"generation": generation})
    spill = settings.store.model_copy(update={"spill_dir": absolute(settings.store.spill_dir)})
    settings = settings.model_copy(update={"store": spill})
    if settings.logs.dir is not None:
        logs = settings.logs.model_copy(update={"dir": absolute(settings.logs.dir)})
        settings = settings.model_copy(update={"logs": logs})
    if settings.auth.tokens_file is not None:
        auth = settings.auth.model_copy(update={"tokens_file": absolute(settings.auth.tokens_file)})
        settings = settings.model_copy(update={"auth": auth})
    prefix = "sqlite:///"
    url = settings.store.url
    if not url.startswith(prefix) or url == f"{prefix}:memory:":
        return settings
    store = settings.store.model_copy(update={"url": prefix + absolute(url[len(prefix) :])})
    return settings.model_copy(update={"store": store})
