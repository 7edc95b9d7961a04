"""Logged decisions from the decision log (SQLite or Postgres) as a :class:`LoggedBandit`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from tipgraph.features import upgrade_from
from tipgraph.store import EVERYTHING, DecisionStore, LogFilter
from tipgraph.store.records import LoggedEvent
from tuning.logged import LoggedBandit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingLog:
    """A log to tune on, with what a registered model must remember about it."""

    log: LoggedBandit
    spec_version: str
    """The feature layout of ``log.X``; a policy tuned on it is refused on any other."""
    trained_through_reward_id: int
    """Largest reward id in the log (0 for logs from outside the decision log): serving
    catches a registered model up on the rewards after it."""
    source: str


def from_events(events: Sequence[LoggedEvent]) -> LoggedBandit:
    """Stack time-ordered events; every candidate keeps its features and served probability."""
    if not events:
        raise ValueError("no logged events: nothing has been learned from feedback yet")
    counts = np.array([len(e.features) for e in events])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return LoggedBandit(
        X=np.array([row for e in events for row in e.features], dtype=np.float64),
        offsets=offsets,
        pscore=np.array([p for e in events for p in e.probabilities], dtype=np.float64),
        chosen=np.array([e.chosen for e in events]),
        reward=np.array([e.reward for e in events], dtype=np.float64),
        event_id=np.array([e.event_id for e in events]),
        timestamp=np.array(
            [e.created_at.replace(tzinfo=None) for e in events], dtype="datetime64[us]"
        ),
    )


def load_log(store: DecisionStore, log_filter: LogFilter = EVERYTHING) -> LoggedBandit:
    """Decisions with a learned reward, time-ordered, that ``log_filter`` selects."""
    return from_events(store.logged_events(log_filter))


def carried_over(event: LoggedEvent, feature_version: str) -> LoggedEvent | None:
    """``event`` on ``feature_version``'s layout: itself, moved from an earlier layout that
    carries over into it (the features added since at 0), or None."""
    if event.feature_version == feature_version:
        return event
    upgrade = upgrade_from(event.feature_version)
    if upgrade is None or upgrade.target.version != feature_version:
        return None
    features = [upgrade.vector(row).tolist() for row in event.features]
    return replace(event, features=features, feature_version=feature_version)


def on_layout(events: Sequence[LoggedEvent], feature_version: str) -> list[LoggedEvent]:
    """The events made on ``feature_version``'s layout, with those of an earlier layout
    that carries over into it (features.EARLIER_LAYOUTS) moved onto it, as serving learns
    them; the rest are skipped with a warning (a reward model or a policy needs one layout)."""
    kept: list[LoggedEvent] = []
    upgraded = 0
    for event in events:
        moved = carried_over(event, feature_version)
        if moved is not None:
            kept.append(moved)
            upgraded += moved is not event
    if upgraded:
        logger.info(
            "%d logged decisions made on an earlier feature layout are carried over to %s, "
            "the features added since at 0",
            upgraded,
            feature_version,
        )
    if len(kept) < len(events):
        logger.warning(
            "skipped %d of %d logged decisions made on other feature layouts than %s",
            len(events) - len(kept),
            len(events),
            feature_version,
        )
    return kept


def load_training_log(
    store: DecisionStore,
    *,
    feature_version: str,
    log_filter: LogFilter = EVERYTHING,
    source: str = "decision log",
) -> TrainingLog:
    """Like :func:`load_log`, keeping only decisions made on ``feature_version``'s layout."""
    kept = on_layout(
        store.logged_events(log_filter),
        feature_version,
    )
    return TrainingLog(
        log=from_events(kept),
        spec_version=feature_version,
        trained_through_reward_id=max((e.reward_id for e in kept), default=0),
        source=source,
    )
