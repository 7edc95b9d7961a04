"""Context and candidate features, and the joint vector the policies learn on.

Candidates change with every request, so policies cannot keep one model per arm.  Instead
every candidate gets one joint vector (Vowpal Wabbit's action-dependent features)::

    x = [ context ⊗ onehot(kind) , candidate features ]

The outer product lets one shared linear model learn "plan_day works in the morning" or
"this user finishes overdue tips", while the candidate block carries what is specific to
the tip (its task's priority, the user's past reward on that kind of tip).

The specification is versioned: :data:`FEATURE_SPEC` hashes the feature names, and every
decision records it, so a model trained on one layout is never applied to another.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import numpy as np

from tipgraph.contracts import TIP_KINDS, RecentReaction, Task, TipRequest
from tipgraph.projection import PROJECTION, cosine
from tipgraph.settings import (
    EligibilitySettings,
    FeatureGroup,
    RewardSettings,
    TipgraphSettings,
)
from tipgraph.store.base import DecisionStore, StoreError
from tipgraph.store.records import ReactionHistoryItem
from tipgraph.text import text_hash

logger = logging.getLogger(__name__)

CONTEXT_FEATURES: tuple[str, ...] = (
    "bias",
    "part_morning",  # 05-12 local
    "part_afternoon",  # 12-17
    "part_evening",  # 17-22
    "part_night",  # 22-05
    "weekend",
    "log_open_tasks",
    "overdue_share",
    "due_today_share",
    "high_priority_share",
)
RECENCY_HALF_LIFE_H = 24.0
RECENCY_FEATURE = f"kind_recency_h{RECENCY_HALF_LIFE_H:g}"
CANDIDATE_FEATURES: tuple[str, ...] = (
    "kind_mean_reward",  # the user's smoothed mean reward on this kind of tip
    "kind_log_shown",
    RECENCY_FEATURE,  # 2^(-hours since the user was last shown this kind / 24); 0 = not lately
    "has_task",
    "task_priority",
    "task_overdue",
    "task_due_today",
    "task_log_age_days",
    "n_tasks_covered",
    "judge_score",  # an LLM tip's score from the judge; 0 when there is none
    "judge_missing",  # 1 for task tips and tips the judge could not score
    "embedding_missing",  # 1 while the tip has no embedding: the block below is zero
    "dismissed_similarity",  # cosine to the closest tip the user recently dismissed or snoozed
    *(f"embedding_{i}_{PROJECTION.version}" for i in range(PROJECTION.dim)),
)
# The groups a policy can be restricted to (PolicySettings.features).  Context groups cover
# their features crossed with every kind.
FEATURE_GROUPS: dict[FeatureGroup, tuple[str, ...]] = {
    "kind": CONTEXT_FEATURES[:1],  # bias x kind: a per-kind intercept
    "time": CONTEXT_FEATURES[1:6],
    "workload": CONTEXT_FEATURES[6:],
    "history": CANDIDATE_FEATURES[:3],
    "task": CANDIDATE_FEATURES[3:9],
    "quality": CANDIDATE_FEATURES[9:11],
    "embedding": CANDIDATE_FEATURES[11:],
}
# Smoothing: a kind the user never saw is assumed to earn PRIOR_REWARD, worth PRIOR_WEIGHT views.
PRIOR_REWARD = 0.3
PRIOR_WEIGHT = 2.0
HIGH_PRIORITY = 3


@dataclass(frozen=True)
class FeatureSpec:
    context: tuple[str, ...]
    kinds: tuple[str, ...]
    candidate: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        joint = [f"{c}*kind={k}" for c in self.context for k in self.kinds]
        return joint + list(self.candidate)

    @property
    def dim(self) -> int:
        return len(self.context) * len(self.kinds) + len(self.candidate)

    def mask(self, groups: Iterable[FeatureGroup]) -> np.ndarray:
        """0/1 array of shape (dim,) that keeps the joint features of ``groups``.

        Zeroing a column is the same as dropping it for ridge-based policies: its row and
        column of A stay λI, its coefficient stays 0 and it adds nothing to any bonus.
        """
        keep = {name for group in groups for name in FEATURE_GROUPS[group]}
        context = [c in keep for c in self.context for _ in self.kinds]
        candidate = [c in keep for c in self.candidate]
        return np.array(context + candidate, dtype=np.float64)

    @property
    def version(self) -> str:
        digest = hashlib.sha256("\n".join(self.names).encode()).hexdigest()[:10]
        return f"v2-{digest}"


FEATURE_SPEC = FeatureSpec(CONTEXT_FEATURES, TIP_KINDS, CANDIDATE_FEATURES)


class LayoutUpgrade:
    """Carries vectors and learned statistics of an earlier layout into a later one.

    Each column of ``source`` moves to the column of the same name in ``target``; a
    feature ``source`` lacks is 0, which every feature added since means ("not shown
    lately").  Statistics Σxxᵀ and Σrx learned on ``source`` vectors, moved the same way,
    equal those learned on the moved vectors, so what serving learned before an upgrade
    that adds features is kept, exactly, rather than relearned.
    """

    def __init__(self, source: FeatureSpec, target: FeatureSpec) -> None:
        missing = set(source.names) - set(target.names)
        if missing:
            raise ValueError(f"{target.version} drops features of {source.version}: {missing}")
        index = {name: i for i, name in enumerate(target.names)}
        self.source = source
        self.target = target
        self.columns = np.array([index[name] for name in source.names], dtype=np.intp)

    def vector(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        """Array of shape (target.dim,)."""
        out = np.zeros(self.target.dim, dtype=np.float64)
        out[self.columns] = x
        return out

    def gram(self, gram: np.ndarray) -> np.ndarray:
        """A (source.dim, source.dim) matrix of Σxxᵀ as (target.dim, target.dim)."""
        out = np.zeros((self.target.dim, self.target.dim), dtype=np.float64)
        out[np.ix_(self.columns, self.columns)] = gram
        return out


# The layouts of earlier releases whose learning carries over into FEATURE_SPEC: each is
# this layout without the features added since.  Their versions are pinned by a test.
EARLIER_LAYOUTS: tuple[FeatureSpec, ...] = (
    FeatureSpec(
        CONTEXT_FEATURES,
        TIP_KINDS,
        tuple(name for name in CANDIDATE_FEATURES if name != RECENCY_FEATURE),
    ),
)
_UPGRADES = {spec.version: LayoutUpgrade(spec, FEATURE_SPEC) for spec in EARLIER_LAYOUTS}
# A logged reward carries its vector but not its layout's version: its length tells.
_UPGRADES_BY_DIM = {spec.dim: _UPGRADES[spec.version] for spec in EARLIER_LAYOUTS}
if len(_UPGRADES_BY_DIM) != len(EARLIER_LAYOUTS) or FEATURE_SPEC.dim in _UPGRADES_BY_DIM:
    raise RuntimeError("every feature layout must have its own dimension")


def upgrade_from(version: str) -> LayoutUpgrade | None:
    """The upgrade from an earlier layout ``version`` to FEATURE_SPEC; None if unknown."""
    return _UPGRADES.get(version)


def upgrade_for_dim(dim: int) -> LayoutUpgrade | None:
    """The upgrade from the earlier layout of dimension ``dim``; None if there is none."""
    return _UPGRADES_BY_DIM.get(dim)


@dataclass(frozen=True)
class TaskFacts:
    """What features need to know about one task, computed once per request."""

    priority: int
    overdue: bool
    due_today: bool
    age_days: float
    content_chars: int


@dataclass(frozen=True)
class KindStats:
    shown: int
    mean_reward: float


@dataclass(frozen=True)
class UserContext:
    """Output of the context stage: everything later stages need, nothing they can recompute."""

    feature_version: str
    vector: list[float]
    local_hour: int
    weekday: int
    tasks: dict[str, TaskFacts]
    kind_stats: dict[str, KindStats]
    overdue: int
    due_today: int
    high_priority: int
    prompt: str = ""
    history_size: int = 0
    dismissed: tuple[tuple[float, ...], ...] = ()
    """Projected embeddings of the tips the user recently dismissed or snoozed."""
    exposures: tuple[tuple[str, str, float], ...] = ()
    """Tips the user was shown lately, (candidate id, kind, Unix seconds), newest first:
    what the eligibility rules read (tipgraph.eligibility); empty when they are off."""
    recency: tuple[tuple[str, float], ...] = ()
    """(kind, :data:`RECENCY_FEATURE`) for each kind the user was shown lately."""


def read_history(
    store: DecisionStore, user_key: str, limit: int
) -> list[ReactionHistoryItem] | None:
    """The user's logged reactions; None while the store is unreachable, so a database
    outage costs personalisation, not the tip (and the caller skips its other reads)."""
    try:
        return store.user_history(user_key, limit)
    except StoreError as err:
        logger.warning("no history for this request, the store is unavailable: %s", err)
        return None


DISMISSED_LIMIT = 10
"""How many of the user's latest dismissed or snoozed tips the novelty feature compares with."""


def read_dismissed(
    store: DecisionStore,
    user_key: str,
    history: Sequence[ReactionHistoryItem],
    embedding_model: str | None,
) -> tuple[tuple[float, ...], ...]:
    """Projected embeddings of the user's latest dismissed or snoozed tips that have one;
    none without an embedder, or while the store is unreachable."""
    if embedding_model is None:
        return ()
    hashes = [text_hash(h.content) for h in history if h.reaction != "done" and h.content]
    if not hashes:
        return ()
    try:
        found = store.cached_projections(user_key, hashes[:DISMISSED_LIMIT], embedding_model)
    except StoreError as err:
        logger.warning("no dismissed-tip embeddings for this request: %s", err)
        return ()
    return tuple(tuple(v) for v in found.values())


def read_exposures(
    store: DecisionStore, user_key: str, settings: EligibilitySettings, lookback_h: float = 0.0
) -> tuple[tuple[str, str, float], ...]:
    """The tips the user was shown within the rules' lookback or ``lookback_h``, whichever
    is longer; none when both are off, or while the store is unreachable (the rules then
    remove nothing and every kind counts as not shown lately)."""
    hours = max(settings.lookback_h if settings.enabled else 0.0, lookback_h)
    if hours <= 0:
        return ()
    since = datetime.now(UTC) - timedelta(hours=hours)
    try:
        shown = store.recent_exposures(user_key, since, settings.max_exposures)
    except StoreError as err:
        logger.warning(
            "no exposures for this request (eligibility rules skipped, no recency): %s", err
        )
        return ()
    return tuple((e.candidate_id, e.kind, e.shown_at.timestamp()) for e in shown)


def kind_recency(
    exposures: Iterable[tuple[str, str, float]], now: float, lookback_h: float
) -> tuple[tuple[str, float], ...]:
    """:data:`RECENCY_FEATURE` per kind shown within ``lookback_h`` hours of ``now``:
    2^(−hours since last shown / half-life); kinds not shown within it are absent (0).

    1 just after a tip of the kind was shown, ½ a half-life later, towards 0 as the user
    recovers from it: the "recovering arm" of Yancey & Settles (2020, KDD), for the
    policy to learn how soon a kind works again.  The lookback is the feature's own, not
    the eligibility rules' (which may read further back), so its meaning never depends on
    them.
    """
    latest: dict[str, float] = {}
    for _, kind, shown_at in exposures:
        if now - shown_at <= lookback_h * 3600.0:
            latest[kind] = max(latest.get(kind, shown_at), shown_at)
    return tuple(
        (kind, 2.0 ** (-max(0.0, now - shown_at) / 3600.0 / RECENCY_HALF_LIFE_H))
        for kind, shown_at in sorted(latest.items())
    )


def read_user_context(
    store: DecisionStore,
    request: TipRequest,
    user_key: str,
    settings: TipgraphSettings,
    embedding_model: str | None,
) -> UserContext:
    """The context stage's work: the user's history, dismissed tips and exposures from the
    store (each degrading to none in an outage), then :func:`build_context`."""
    history = read_history(store, user_key, settings.features.history_limit)
    if history is None:
        # Unreachable: each further read would wait out the store's timeout again.
        return build_context(request, [], settings.rewards)
    dismissed = read_dismissed(store, user_key, history, embedding_model)
    lookback_h = settings.features.recency_lookback_h
    exposures = read_exposures(store, user_key, settings.eligibility, lookback_h)
    context = build_context(request, history, settings.rewards, dismissed=dismissed)
    if not exposures:
        return context
    # The wall clock, as the rules use: exposures are stamped by it, whatever the request's now.
    recency = kind_recency(exposures, time.time(), lookback_h)
    rules_read = exposures if settings.eligibility.enabled else ()
    return replace(context, exposures=rules_read, recency=recency)


def part_of_day(hour: int) -> str:
    if 5 <= hour < 12:
        return "morning"
    if 12 <= hour < 17:
        return "afternoon"
    if 17 <= hour < 22:
        return "evening"
    return "night"


def task_facts(task: Task, now: datetime) -> TaskFacts:
    overdue = due_today = False
    if task.due is not None:
        due = task.due if task.due.tzinfo else task.due.replace(tzinfo=now.tzinfo)
        due_local = due.astimezone(now.tzinfo)
        # A date-only due (midnight) is due all day, so "overdue" means a past day.
        overdue = due_local.date() < now.date() or (
            due_local.date() == now.date()
            and due_local.time() != datetime.min.time()
            and due_local < now
        )
        due_today = due_local.date() == now.date() and not overdue
    age_days = 0.0
    if task.created_at is not None:
        created = (
            task.created_at
            if task.created_at.tzinfo
            else task.created_at.replace(tzinfo=now.tzinfo)
        )
        age_days = max(0.0, (now - created).total_seconds() / 86400.0)
    return TaskFacts(task.priority, overdue, due_today, age_days, len(task.content))


def kind_stats(
    history: Iterable[ReactionHistoryItem],
    recent: Iterable[RecentReaction],
    rewards: RewardSettings,
) -> dict[str, KindStats]:
    """Smoothed mean reward per tip kind from logged and client-reported reactions."""
    total = dict.fromkeys(TIP_KINDS, 0.0)
    count = dict.fromkeys(TIP_KINDS, 0)
    for item in history:
        if item.kind in total:
            total[item.kind] += item.reward
            count[item.kind] += 1
    for reaction in recent:
        total[reaction.kind] += rewards.reward_for(reaction.reaction)
        count[reaction.kind] += 1
    return {
        kind: KindStats(
            count[kind],
            (total[kind] + PRIOR_REWARD * PRIOR_WEIGHT) / (count[kind] + PRIOR_WEIGHT),
        )
        for kind in TIP_KINDS
    }


def build_context(
    request: TipRequest,
    history: Sequence[ReactionHistoryItem],
    rewards: RewardSettings,
    *,
    dismissed: tuple[tuple[float, ...], ...] = (),
) -> UserContext:
    """Tasks + past reactions + time patterns -> the context of one decision."""
    now = request.local_now()
    facts = {task.id: task_facts(task, now) for task in request.tasks}
    n_tasks = len(facts)
    overdue = sum(f.overdue for f in facts.values())
    due_today = sum(f.due_today for f in facts.values())
    high = sum(f.priority >= HIGH_PRIORITY for f in facts.values())
    part = part_of_day(now.hour)
    vector = [
        1.0,
        float(part == "morning"),
        float(part == "afternoon"),
        float(part == "evening"),
        float(part == "night"),
        float(now.weekday() >= 5),
        math.log1p(n_tasks) / math.log1p(500),
        overdue / n_tasks,
        due_today / n_tasks,
        high / n_tasks,
    ]
    stats = kind_stats(history, request.recent_reactions, rewards)
    context = UserContext(
        feature_version=FEATURE_SPEC.version,
        vector=vector,
        local_hour=now.hour,
        weekday=now.weekday(),
        tasks=facts,
        kind_stats=stats,
        overdue=overdue,
        due_today=due_today,
        high_priority=high,
        history_size=len(history),
        dismissed=dismissed,
    )
    return _with_prompt(context, request)


def _with_prompt(context: UserContext, request: TipRequest) -> UserContext:
    """The prompt's context section: time and counts only, never task text.

    The task list is rendered by the generation stage, which knows whether raw task text
    may be sent to the LLM (``generation.send_task_text``).
    """
    lines = [
        f"Local time: {context.local_hour:02d}:00, weekday {context.weekday} (0 = Monday).",
        f"Open tasks: {len(request.tasks)}; overdue {context.overdue}, due today "
        f"{context.due_today}, high priority {context.high_priority}.",
    ]
    return replace(context, prompt="\n".join(lines))


@dataclass(frozen=True)
class CandidateView:
    """The part of a candidate the features read (kept small so it travels cheaply)."""

    kind: str
    task_ids: tuple[str, ...]
    judge_score: float | None = None
    embedding: tuple[float, ...] | None = None
    """The tip's projected embedding (PROJECTION.dim values); None until it has one."""


def _quality_features(context: UserContext, candidate: CandidateView) -> list[float]:
    """judge_score, judge_missing, embedding_missing, dismissed_similarity, embedding_*."""
    judge = candidate.judge_score
    embedding = candidate.embedding
    if embedding is None or len(embedding) != PROJECTION.dim:
        block = [0.0] * PROJECTION.dim
        similarity, missing = 0.0, 1.0
    else:
        block = list(embedding)
        similarity = max((cosine(embedding, d) for d in context.dismissed), default=0.0)
        missing = 0.0
    return [
        judge if judge is not None else 0.0,
        float(judge is None),
        missing,
        max(similarity, 0.0),
        *block,
    ]


def candidate_matrix(context: UserContext, candidates: Sequence[CandidateView]) -> np.ndarray:
    """Joint feature matrix, array of shape (n_candidates, FEATURE_SPEC.dim)."""
    ctx = np.asarray(context.vector, dtype=np.float64)
    n_ctx, n_kinds = len(ctx), len(FEATURE_SPEC.kinds)
    kind_index = {kind: i for i, kind in enumerate(FEATURE_SPEC.kinds)}
    X = np.zeros((len(candidates), FEATURE_SPEC.dim), dtype=np.float64)
    recency = dict(context.recency)
    for row, candidate in enumerate(candidates):
        k = kind_index[candidate.kind]
        # Column c * n_kinds + k holds context[c] for this candidate's kind, zero elsewhere.
        X[row, k : n_ctx * n_kinds : n_kinds] = ctx
        stats = context.kind_stats[candidate.kind]
        tasks = [context.tasks[t] for t in candidate.task_ids if t in context.tasks]
        lead = max(tasks, key=lambda f: f.priority) if tasks else None
        X[row, n_ctx * n_kinds :] = (
            stats.mean_reward,
            math.log1p(stats.shown) / math.log1p(1000),
            recency.get(candidate.kind, 0.0),
            float(lead is not None),
            (lead.priority - 1) / 3 if lead else 0.0,
            float(lead.overdue) if lead else 0.0,
            float(lead.due_today) if lead else 0.0,
            math.log1p(lead.age_days) / math.log1p(365) if lead else 0.0,
            min(len(tasks), 10) / 10,
            *_quality_features(context, candidate),
        )
    return X
