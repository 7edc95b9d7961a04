"""Plain records that cross the store boundary. No SQL, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np

PolicyRole = Literal["served", "shadow"]
RewardSource = Literal["feedback", "default"]
"""Where a reward came from: the user's feedback in time, or the default for silence."""


@dataclass(frozen=True, slots=True)
class CandidateRecord:
    """One candidate tip as the policies saw it."""

    candidate_id: str
    position: int
    kind: str
    source: str
    content: str
    task_ref: str | None
    model: str | None
    prompt_version: str | None
    features: list[float]


@dataclass(frozen=True, slots=True)
class PolicyScoresRecord:
    """What one policy (served or shadow) said about every candidate of one event.

    ``scores`` and ``probabilities`` are aligned with the candidates' ``position``.  The
    log keeps the probabilities (what off-policy evaluation and the report read), not the
    scores.
    """

    policy_name: str
    policy_version: str
    role: PolicyRole
    scores: list[float]
    probabilities: list[float]
    chosen_candidate_id: str | None
    chosen_probability: float | None
    latency_ms: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyScoresEntry:
    """Shadow (or late) policy runs for one event, as the decision log queues them;
    ``candidate_ids`` aligns each run's scores to the event's candidates."""

    event_id: str
    runs: Sequence[PolicyScoresRecord]
    candidate_ids: Sequence[str]


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    event_id: str
    user_key: str
    created_at: datetime
    policy_name: str
    policy_version: str
    feature_version: str
    prompt_version: str | None
    generation_source: str
    chosen_candidate_id: str
    chosen_kind: str
    chosen_probability: float
    latency_ms: dict[str, float]
    candidates: list[CandidateRecord]
    served: PolicyScoresRecord
    generation_reason: str | None = None
    llm_model: str | None = None
    user_key_id: str | None = None
    """Which HMAC key made ``user_key`` (privacy.user_key_id); None before key ids."""
    llm_pool: str | None = None
    """'hit': the LLM candidates came from the pool; 'miss': none were ready (task tips
    served, a refill queued); None: the pool was not asked (task mode, inline LLM)."""
    llm_pool_age_s: float | None = None
    """On a hit, how long ago the pool's tips were generated."""
    ineligible: dict[str, int] = field(default_factory=dict)
    """Candidates the eligibility rules removed before scoring, by rule; empty when none
    fired (tipgraph.eligibility)."""


@dataclass(frozen=True, slots=True)
class PolicyOutcomes:
    """One policy's decisions in a window: the rewards they earned (count, sum, sum of
    squares) and the feedback they got (answered, dismissed)."""

    rewarded: int
    reward_sum: float
    reward_squares: float
    answered: int
    dismissed: int


@dataclass(frozen=True, slots=True)
class ExposureItem:
    """A tip the user was shown: the served candidate of one of their decisions."""

    candidate_id: str
    kind: str
    shown_at: datetime


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    event_id: str
    reaction: str
    value: float | None
    reward: float
    reacted_at: datetime
    received_at: datetime


@dataclass(frozen=True, slots=True)
class FeedbackOutcome:
    """What recording one piece of feedback did.

    ``record`` is what the store holds and ``created`` is False when it was already there
    (the first feedback wins).  ``learned`` says whether that stored feedback became the
    event's reward, and ``reward_id`` is that reward row (None when not learned): feedback
    that came too late, without a logged decision, or after a default reward is kept for
    the record but the policies never learn from it.  A retry gets the first call's answer.
    """

    record: FeedbackRecord
    created: bool
    learned: bool
    reward_id: int | None


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """What learning from feedback needs about a logged decision."""

    event_id: str
    user_key: str
    created_at: datetime
    policy_name: str
    policy_version: str
    chosen_candidate_id: str
    chosen_kind: str
    chosen_probability: float
    chosen_features: list[float]


@dataclass(frozen=True, slots=True)
class DecisionEventRow:
    """A stored decision's event waiting in the outbox (``bus.decision_events``):
    ``tipgraph.events.v1.DecisionEvent`` as the store keeps it."""

    seq: int
    event_id: str
    created_at: datetime
    policy_name: str
    policy_version: str
    prompt_version: str | None
    candidate_id: str
    probability: float


@dataclass(frozen=True, slots=True)
class TrainingEvent:
    """One (features of the shown tip, reward) pair, in reward order.

    ``reward_id`` increases in commit order, so a reader can resume after the largest one
    it has seen (see :meth:`DecisionStore.training_events`).
    """

    reward_id: int
    event_id: str
    features: list[float]
    reward: float
    source: RewardSource
    rewarded_at: datetime
    """When the reward was logged: feedback's arrival, or the default reward's run; what a
    forgetting policy weighs it by."""


@dataclass(frozen=True, slots=True)
class LoggedEvent:
    """One learned decision as off-policy evaluation needs it.

    ``features`` (a read-only float64 matrix, a row per candidate) and ``probabilities``
    list every candidate in generation order; the probabilities are the logging (served)
    policy's; ``chosen`` indexes both.
    """

    event_id: str
    created_at: datetime
    policy_name: str
    prompt_version: str | None
    features: np.ndarray
    probabilities: list[float]
    chosen: int
    reward: float
    reward_source: RewardSource
    reward_id: int
    feature_version: str


@dataclass(frozen=True, slots=True)
class LoggedPolicyRun:
    """What one policy (served or shadow) answered on one learned decision.

    ``probabilities`` list every candidate in generation order, like
    :attr:`LoggedEvent.features`; they are empty when the run logged no scores (it failed:
    see ``error``).  ``chosen`` indexes them, None when the policy chose nothing.
    """

    policy_name: str
    policy_version: str
    role: PolicyRole
    probabilities: list[float]
    chosen: int | None
    error: str | None


@dataclass(frozen=True, slots=True)
class LoggedRuns:
    """Every policy's run on one learned decision, and how its candidates were generated
    (``generation_source``: tasks, llm, mixed or fallback); ``runs`` by policy name."""

    event_id: str
    generation_source: str
    runs: list[LoggedPolicyRun]


@dataclass(frozen=True, slots=True)
class ReactionHistoryItem:
    kind: str
    reaction: str
    reward: float
    shown_at: datetime
    content: str = ""
    """The tip's text (kept for the tip shown)."""


@dataclass(slots=True)
class StoreCounts:
    decisions: int = 0
    candidates: int = 0
    policy_runs: int = 0
    """Every policy's run: the served one of each decision, and the shadows'."""
    feedback: int = 0
    rewards: int = 0
    default_rewards: int = 0
    by_role: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ExpiredRows:
    """Rows a retention run deleted; runs (and batches) add up with ``+``."""

    decisions: int = 0
    """With their candidates; their rewards stay, keeping the features they trained on."""
    feedback: int = 0
    policy_runs: int = 0
    """Every policy's run on the deleted decisions, and shadow runs whose decision never
    arrived."""
    embeddings: int = 0

    def __add__(self, other: ExpiredRows) -> ExpiredRows:
        return ExpiredRows(
            self.decisions + other.decisions,
            self.feedback + other.feedback,
            self.policy_runs + other.policy_runs,
            self.embeddings + other.embeddings,
        )


@dataclass(frozen=True, slots=True)
class PoolKey:
    """One candidate-pool entry: a user's task set (fingerprint) under one prompt version."""

    user_key: str
    fingerprint: str
    prompt_version: str


@dataclass(frozen=True, slots=True)
class PoolTip:
    """A generated tip that passed the judge (or was kept unjudged, failing open)."""

    content: str
    kind: str
    task_id: str | None
    judge_score: float | None
    """The judge's score in [0, 1]; None when the judge could not be asked."""
    embedding: tuple[float, ...] | None = None
    """The tip's projected embedding (the policies' features); None without one."""


@dataclass(frozen=True, slots=True)
class PoolEntry:
    key: PoolKey
    tips: tuple[PoolTip, ...]
    model: str | None
    judge_version: str | None
    generated_at: datetime
    serves: int
    """Decisions this entry served, as counted in the store (replicas flush their counts
    every second or so)."""
