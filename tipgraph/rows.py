"""The decision log's rows, built from what the stages answered: one served decision, and
one policy's run (served, shadow, or a shadow's failure) on an event."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from tipgraph.contracts import StageLatency
from tipgraph.features import UserContext
from tipgraph.generation import GenerationResult
from tipgraph.privacy import pseudonymise
from tipgraph.scoring import PolicyScore
from tipgraph.settings import PrivacySettings
from tipgraph.store.records import CandidateRecord, DecisionRecord, PolicyRole, PolicyScoresRecord


def policy_run(
    result: PolicyScore, role: PolicyRole, candidate_ids: Sequence[str], latency_ms: float
) -> PolicyScoresRecord:
    """The log row of one policy's answer for one event."""
    return PolicyScoresRecord(
        policy_name=result.policy_name,
        policy_version=result.policy_version,
        role=role,
        scores=result.scores,
        probabilities=result.probabilities,
        chosen_candidate_id=candidate_ids[result.chosen],
        chosen_probability=result.chosen_probability,
        latency_ms=latency_ms,
    )


def failed_run(policy_name: str, error: str, latency_ms: float) -> PolicyScoresRecord:
    """The log row of a shadow that failed on one event: the error, no scores."""
    return PolicyScoresRecord(
        policy_name=policy_name,
        policy_version="",
        role="shadow",
        scores=[],
        probabilities=[],
        chosen_candidate_id=None,
        chosen_probability=None,
        latency_ms=latency_ms,
        error=error,
    )


def decision_record(
    settings: PrivacySettings,
    secret: str,
    event_id: str,
    user_key: str,
    context: UserContext,
    generation: GenerationResult,
    X: np.ndarray,
    result: PolicyScore,
    latency: StageLatency,
    *,
    ineligible: dict[str, int] | None = None,
) -> DecisionRecord:
    """The log row of one served decision: every candidate with its features, the served
    policy's run, the stage latencies; ``secret`` pseudonymises the task references."""
    candidates = generation.candidates
    chosen = candidates[result.chosen]
    records = [
        CandidateRecord(
            candidate_id=c.candidate_id,
            position=i,
            kind=c.kind,
            source=c.source,
            # Task-mode tips quote the user's task: only the tip actually shown is kept,
            # unless privacy.store_candidate_text says otherwise, and with the quote only
            # under privacy.store_tip_text: quote.
            content=c.stored_content(settings.store_tip_text)
            if i == result.chosen or settings.store_candidate_text
            else "",
            task_ref=pseudonymise(secret, c.task_id, namespace=user_key) if c.task_id else None,
            model=c.model,
            prompt_version=c.prompt_version,
            features=X[i].tolist(),
        )
        for i, c in enumerate(candidates)
    ]
    return DecisionRecord(
        event_id=event_id,
        user_key=user_key,
        created_at=datetime.now(UTC),
        policy_name=result.policy_name,
        policy_version=result.policy_version,
        feature_version=context.feature_version,
        prompt_version=generation.prompt_version,
        generation_source=generation.source,
        generation_reason=generation.reason,
        llm_model=generation.model,
        user_key_id=settings.user_key_id,
        llm_pool=generation.pool,
        llm_pool_age_s=generation.pool_age_s,
        chosen_candidate_id=chosen.candidate_id,
        chosen_kind=chosen.kind,
        chosen_probability=result.chosen_probability,
        latency_ms=latency.model_dump(),
        candidates=records,
        served=policy_run(result, "served", [c.candidate_id for c in candidates], latency.scoring),
        ineligible=dict(ineligible or {}),
    )
