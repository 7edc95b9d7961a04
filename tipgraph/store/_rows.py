"""Record <-> row conversion shared by both backends.

Both databases receive the same Python values: timestamps as fixed-width ISO-8601 UTC text
(SQLite keeps it as TEXT, Postgres casts it to TIMESTAMPTZ) and float lists as JSON text
(TEXT / JSONB).  Reading back, each helper accepts either driver's native type, so the
backends differ only in how they connect, not in what they store.

The column order of every tuple here is the column order of the matching statement in
:mod:`tipgraph.store._sql`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

from tipgraph.settings import Reaction
from tipgraph.store import packing
from tipgraph.store.records import (
    CandidateRecord,
    DecisionEventRow,
    DecisionRecord,
    FeedbackOutcome,
    FeedbackRecord,
    LoggedEvent,
    LoggedPolicyRun,
    LoggedRuns,
    PolicyRole,
    PolicyScoresRecord,
    PoolEntry,
    PoolKey,
    PoolTip,
    ReactionHistoryItem,
    RewardSource,
    StoreCounts,
    StoredDecision,
    TrainingEvent,
)
from tipgraph.text import clean_text

Row = Sequence[Any]
Params = tuple[Any, ...]

LATENCY_STAGES = ("context", "generation", "scoring", "total")
"""Keys of ``DecisionRecord.latency_ms`` that have a column; a missing key is stored as NULL."""

REACTIONS: frozenset[str] = frozenset(get_args(Reaction))
POLICY_ROLES: frozenset[str] = frozenset(get_args(PolicyRole))
REWARD_SOURCES: frozenset[str] = frozenset(get_args(RewardSource))


def db_timestamp(value: datetime, *, what: str) -> str:
    """Aware datetime -> ISO-8601 UTC text of fixed width, so text order is time order."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def utc_datetime(raw: datetime | str) -> datetime:
    """What either driver returns for a timestamp -> aware UTC datetime."""
    value = datetime.fromisoformat(raw) if isinstance(raw, str) else raw
    if value.tzinfo is None:
        # Only written by hand outside the store; every value we write carries an offset.
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def db_text(value: str | None) -> str | None:
    """Text as the store keeps it: cleaned of controls, bidi overrides and lone surrogates
    (Postgres refuses NUL, and no reader wants the others), whoever produced it."""
    return None if value is None else clean_text(value)


def db_floats(values: Sequence[float], *, what: str) -> str:
    """Float list -> JSON text. ``repr``-exact, so the floats read back are the floats written."""
    floats = [float(v) for v in values]
    if not all(math.isfinite(v) for v in floats):
        raise ValueError(f"{what} must be finite floats, got {floats!r}")
    return json.dumps(floats)


def float_list(raw: str | Sequence[Any]) -> list[float]:
    """JSON text (SQLite) or an already-decoded JSONB list (Postgres) -> ``list[float]``.

    JSONB keeps numbers as ``numeric`` and prints 1e300 as an integer, hence the ``float()``.
    """
    values = json.loads(raw) if isinstance(raw, str) else raw
    return [float(v) for v in values]


def _latencies(latency_ms: dict[str, float]) -> tuple[float | None, ...]:
    return tuple(
        float(latency_ms[stage]) if stage in latency_ms else None for stage in LATENCY_STAGES
    )


@dataclass(frozen=True, slots=True)
class DecisionRows:
    """Every row one batch of decisions writes: one per decision, its candidates and the
    served policy's run packed into it (:mod:`tipgraph.store.packing`)."""

    decisions: list[Params]


def decision_rows(decisions: Sequence[DecisionRecord]) -> DecisionRows:
    """Validate a batch and flatten it into rows; raises ValueError before anything is written."""
    rows = DecisionRows([])
    for decision in decisions:
        created_at = db_timestamp(decision.created_at, what=f"{decision.event_id}: created_at")
        candidates = sorted(decision.candidates, key=lambda c: c.position)
        candidate_ids = [c.candidate_id for c in candidates]
        if len(set(candidate_ids)) != len(candidate_ids):
            raise ValueError(f"{decision.event_id}: duplicate candidate ids {candidate_ids}")
        if decision.chosen_candidate_id not in candidate_ids:
            raise ValueError(
                f"{decision.event_id}: chosen_candidate_id {decision.chosen_candidate_id!r} "
                f"is not one of the candidates {candidate_ids}"
            )
        served = decision.served
        if served.role != "served" or served.policy_name != decision.policy_name:
            raise ValueError(
                f"{decision.event_id}: served must be the run of policy "
                f"{decision.policy_name!r} with role 'served', got {served.policy_name!r} "
                f"with role {served.role!r}"
            )
        if len(served.probabilities) != len(candidates):
            raise ValueError(
                f"{decision.event_id}: the served run needs one probability per candidate "
                f"({len(candidates)}), got {len(served.probabilities)}"
            )
        chosen = candidates[candidate_ids.index(decision.chosen_candidate_id)]
        packed = packing.pack_candidates(
            [
                packing.CandidateTexts(
                    c.candidate_id,
                    c.kind,
                    c.source,
                    # The shown tip's text is the decision row's chosen_content.
                    None if c is chosen else db_text(c.content),
                    c.task_ref,
                    db_text(c.model),
                    db_text(c.prompt_version),
                )
                for c in candidates
            ],
            [c.features for c in candidates],
            served.probabilities,
        )
        rows.decisions.append(
            (
                decision.event_id,
                decision.user_key,
                created_at,
                decision.policy_name,
                decision.policy_version,
                decision.feature_version,
                db_text(decision.prompt_version),
                decision.generation_source,
                decision.chosen_candidate_id,
                decision.chosen_kind,
                float(decision.chosen_probability),
                *_latencies(decision.latency_ms),
                db_text(decision.generation_reason),
                db_text(decision.llm_model),
                decision.user_key_id,
                decision.llm_pool,
                None if decision.llm_pool_age_s is None else float(decision.llm_pool_age_s),
                json.dumps(decision.ineligible, sort_keys=True) if decision.ineligible else None,
                len(candidates),
                packed,
                db_text(chosen.content) or None,
            )
        )
    return rows


def policy_run_row(
    event_id: str, run: PolicyScoresRecord, candidate_ids: Sequence[str], created_at: str
) -> Params:
    """One ``policy_runs`` row: a shadow's run, its probabilities packed.

    A run that failed may carry no probabilities at all; otherwise there is one per
    candidate, in ``candidate_ids`` order.  The served run is part of its decision's row.
    """
    if run.role != "shadow":
        raise ValueError(
            f"{event_id}/{run.policy_name}: only shadow runs are logged apart from their "
            f"decision, got role {run.role!r}"
        )
    if len(run.scores) != len(run.probabilities) or (
        run.probabilities and len(run.probabilities) != len(candidate_ids)
    ):
        raise ValueError(
            f"{event_id}/{run.policy_name}: expected {len(candidate_ids)} scores and "
            f"probabilities (one per candidate) or none, got {len(run.scores)} scores and "
            f"{len(run.probabilities)} probabilities"
        )
    what = f"{event_id}/{run.policy_name}: probabilities"
    return (
        event_id,
        run.policy_name,
        run.policy_version,
        run.role,
        run.chosen_candidate_id,
        None if run.chosen_probability is None else float(run.chosen_probability),
        float(run.latency_ms),
        db_text(run.error),
        created_at,
        packing.pack_floats(run.probabilities, what=what) if run.probabilities else None,
    )


def chosen_features(packed: bytes, chosen_candidate_id: str) -> list[float]:
    return packing.unpack_candidates(packed).row(chosen_candidate_id)


def candidate_records(
    packed: bytes, chosen_candidate_id: str, chosen_content: str | None
) -> list[CandidateRecord]:
    candidates = packing.unpack_candidates(packed)
    return [
        CandidateRecord(
            candidate_id=t.candidate_id,
            position=i,
            kind=t.kind,
            source=t.source,
            content=(chosen_content if t.candidate_id == chosen_candidate_id else t.content) or "",
            task_ref=t.task_ref,
            model=t.model,
            prompt_version=t.prompt_version,
            features=candidates.features[i].tolist(),
        )
        for i, t in enumerate(candidates.texts)
    ]


def decision_event_params(decision: Row) -> Params:
    """The outbox row of an ``insert_decision`` row (its columns, in that statement's order)."""
    event_id, _, created_at, policy_name, policy_version, _, prompt_version = decision[:7]
    candidate_id, _, probability = decision[8:11]
    return (
        event_id,
        created_at,
        policy_name,
        policy_version,
        prompt_version,
        candidate_id,
        probability,
    )


def decision_event_row(row: Row) -> DecisionEventRow:
    seq, event_id, created_at, policy_name, policy_version, prompt_version, candidate, p = row
    return DecisionEventRow(
        seq=int(seq),
        event_id=event_id,
        created_at=utc_datetime(created_at),
        policy_name=policy_name,
        policy_version=policy_version,
        prompt_version=prompt_version,
        candidate_id=candidate,
        probability=float(p),
    )


def stored_decision(row: Row) -> StoredDecision:
    (event_id, user_key, created_at, policy_name, policy_version, chosen_candidate_id,
     chosen_kind, chosen_probability, packed) = row  # fmt: skip
    return StoredDecision(
        event_id=event_id,
        user_key=user_key,
        created_at=utc_datetime(created_at),
        policy_name=policy_name,
        policy_version=policy_version,
        chosen_candidate_id=chosen_candidate_id,
        chosen_kind=chosen_kind,
        chosen_probability=float(chosen_probability),
        chosen_features=chosen_features(packed, chosen_candidate_id),
    )


def finite_float(value: float, *, what: str) -> float:
    """A finite float, or ValueError naming ``what``: NaN or inf would poison every model."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def feedback_params(feedback: FeedbackRecord) -> Params:
    """Validated feedback columns, without ``learned``: that is decided in the transaction."""
    if feedback.reaction not in REACTIONS:
        raise ValueError(
            f"{feedback.event_id}: reaction must be one of {sorted(REACTIONS)}, "
            f"got {feedback.reaction!r}"
        )
    return (
        feedback.event_id,
        feedback.reaction,
        None if feedback.value is None else float(feedback.value),
        float(feedback.reward),
        db_timestamp(feedback.reacted_at, what=f"{feedback.event_id}: reacted_at"),
        db_timestamp(feedback.received_at, what=f"{feedback.event_id}: received_at"),
    )


def feedback_record(row: Row) -> FeedbackRecord:
    """A feedback row's first six columns (``feedback`` and ``held_feedback`` alike)."""
    event_id, reaction, value, reward, reacted_at, received_at = row
    return FeedbackRecord(
        event_id=event_id,
        reaction=reaction,
        value=None if value is None else float(value),
        reward=float(reward),
        reacted_at=utc_datetime(reacted_at),
        received_at=utc_datetime(received_at),
    )


def feedback_outcome(row: Row, *, created: bool) -> FeedbackOutcome:
    """A stored feedback row with its ``learned`` flag and the reward it produced, if any.

    SQLite hands ``learned`` back as 0/1, Postgres as a bool.
    """
    learned, reward_id = row[6:]
    return FeedbackOutcome(
        record=feedback_record(row[:6]),
        created=created,
        learned=bool(learned),
        reward_id=None if reward_id is None else int(reward_id),
    )


def reward_source(raw: str) -> RewardSource:
    """The ``source`` column, narrowed; the table's CHECK constraint allows nothing else."""
    if raw == "feedback":
        return "feedback"
    if raw == "default":
        return "default"
    raise ValueError(f"reward source must be one of {sorted(REWARD_SOURCES)}, got {raw!r}")


def training_event(row: Row) -> TrainingEvent:
    """(reward_id, event_id, kept features, reward, source, created_at, the decision's
    packed candidates, its chosen id): the reward's own copy of its features once the
    decision is gone, else the chosen candidate's."""
    reward_id, event_id, kept, reward, source, created_at, packed, chosen_id = row
    return TrainingEvent(
        reward_id=int(reward_id),
        event_id=event_id or "",  # "" once the decision was erased
        features=(
            packing.unpack_vector(kept) if kept is not None else chosen_features(packed, chosen_id)
        ),
        reward=float(reward),
        source=reward_source(source),
        rewarded_at=utc_datetime(created_at),
    )


def logged_event(row: Row) -> LoggedEvent:
    """One learned decision: (event_id, created_at, policy_name, prompt_version, chosen id,
    reward, source, reward_id, feature_version, packed candidates, ...); the columns after
    those are the served run's (:func:`logged_runs`)."""
    (event_id, created_at, policy_name, prompt_version, chosen_id, reward, source, reward_id,
     feature_version, packed) = row[:10]  # fmt: skip
    candidates = packing.unpack_candidates(packed)
    ids = candidates.candidate_ids
    if chosen_id not in ids:
        raise ValueError(f"{event_id}: chosen candidate {chosen_id!r} is not a candidate")
    return LoggedEvent(
        event_id=event_id,
        created_at=utc_datetime(created_at),
        policy_name=policy_name,
        prompt_version=prompt_version,
        features=candidates.features,  # read-only: a view of the unpacked value
        probabilities=candidates.probabilities.tolist(),
        chosen=ids.index(chosen_id),
        reward=float(reward),
        reward_source=reward_source(source),
        reward_id=int(reward_id),
        feature_version=str(feature_version),
    )


def policy_role(raw: str) -> PolicyRole:
    """The ``role`` column, narrowed; the table's CHECK constraint allows nothing else."""
    if raw == "served":
        return "served"
    if raw == "shadow":
        return "shadow"
    raise ValueError(f"policy role must be one of {sorted(POLICY_ROLES)}, got {raw!r}")


def logged_runs(decisions: Sequence[Row], shadows: Sequence[Row]) -> list[LoggedRuns]:
    """Every policy's run on each decision, runs by policy name.

    ``decisions``: the rows :func:`logged_event` reads, then generation_source and
    policy_version, in the order to return; ``shadows``: (event_id, policy_name,
    policy_version, role, chosen id, error, packed probabilities) of those decisions.
    """
    by_event: dict[str, list[Row]] = {}
    for row in shadows:
        by_event.setdefault(row[0], []).append(row)
    events: list[LoggedRuns] = []
    for row in decisions:
        event_id, policy_name, chosen_id = row[0], row[2], row[4]
        packed, source, policy_version = row[9:12]
        candidates = packing.unpack_candidates(packed)
        ids = candidates.candidate_ids
        served = LoggedPolicyRun(
            policy_name=policy_name,
            policy_version=policy_version,
            role="served",
            probabilities=candidates.probabilities.tolist(),
            chosen=ids.index(chosen_id) if chosen_id in ids else None,
            error=None,
        )
        runs = [served] + [
            LoggedPolicyRun(
                policy_name=name,
                policy_version=version,
                role=policy_role(role),
                # A failed run logs no probabilities; nor does a run on other candidates.
                probabilities=(
                    probabilities
                    if (probabilities := _probabilities(raw)) and len(probabilities) == len(ids)
                    else []
                ),
                chosen=ids.index(chosen) if chosen in ids else None,
                error=error,
            )
            for _, name, version, role, chosen, error, raw in by_event.get(event_id, ())
            if name != policy_name
        ]
        runs.sort(key=lambda run: run.policy_name)
        events.append(LoggedRuns(event_id, generation_source=source, runs=runs))
    return events


def _probabilities(raw: bytes | None) -> list[float]:
    return [] if raw is None else packing.unpack_floats(raw)


def history_item(row: Row) -> ReactionHistoryItem:
    kind, reaction, reward, shown_at, content = row
    return ReactionHistoryItem(
        kind=kind,
        reaction=reaction,
        reward=float(reward),
        shown_at=utc_datetime(shown_at),
        content=content or "",
    )


def store_counts(row: Row) -> StoreCounts:
    decisions, candidates, shadow, feedback, rewards, default_rewards = map(int, row)
    return StoreCounts(
        decisions=decisions,
        candidates=candidates,
        policy_runs=decisions + shadow,
        feedback=feedback,
        rewards=rewards,
        default_rewards=default_rewards,
        by_role={"served": decisions, "shadow": shadow},
    )


def pool_tips_json(tips: Sequence[PoolTip]) -> str:
    """A pool entry's tips as JSON text; the text is cleaned like every text the store keeps."""
    return json.dumps(
        [
            {
                "content": clean_text(t.content),
                "kind": t.kind,
                "task_id": db_text(t.task_id),
                "judge_score": None if t.judge_score is None else float(t.judge_score),
                "embedding": None if t.embedding is None else [float(x) for x in t.embedding],
            }
            for t in tips
        ]
    )


def pool_entry(key: PoolKey, row: Row) -> PoolEntry:
    """(tips, model, judge_version, generated_at, serves) -> the entry."""
    raw, model, judge_version, generated_at, serves = row
    items = json.loads(raw) if isinstance(raw, str) else raw
    tips = tuple(
        PoolTip(
            content=str(i["content"]),
            kind=str(i["kind"]),
            task_id=None if i.get("task_id") is None else str(i["task_id"]),
            judge_score=None if i.get("judge_score") is None else float(i["judge_score"]),
            embedding=None if i.get("embedding") is None else tuple(map(float, i["embedding"])),
        )
        for i in items
    )
    return PoolEntry(key, tips, model, judge_version, utc_datetime(generated_at), int(serves))
