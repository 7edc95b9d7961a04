"""Logged decisions from the decision log (SQLite or Postgres) as a :class:`LoggedBandit`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
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
    return from_pages([events])


@dataclass
class _Page:
    """One page of events as arrays; X is the big one."""

    X: np.ndarray
    counts: np.ndarray
    pscore: np.ndarray
    chosen: np.ndarray
    reward: np.ndarray
    event_id: np.ndarray
    timestamp: np.ndarray

    @classmethod
    def of(cls, events: Sequence[LoggedEvent]) -> _Page:
        return cls(
            X=np.concatenate([np.asarray(e.features, dtype=np.float64) for e in events]),
            counts=np.array([len(e.features) for e in events], dtype=np.int64),
            pscore=np.array([p for e in events for p in e.probabilities], dtype=np.float64),
            chosen=np.array([e.chosen for e in events], dtype=np.int64),
            reward=np.array([e.reward for e in events], dtype=np.float64),
            event_id=np.array([e.event_id for e in events], dtype=object),
            timestamp=np.array(
                [e.created_at.replace(tzinfo=None) for e in events], dtype="datetime64[us]"
            ),
        )


def from_pages(pages: Iterable[Sequence[LoggedEvent]]) -> LoggedBandit:
    """:func:`from_events` over pages of time-ordered events, with memory for the log's
    arrays and one page: each page becomes arrays at once (no Python float survives it),
    and the pages' feature rows are copied into the log's one matrix a page at a time,
    each page freed as it is copied.  The matrix's memory is taken as it is written, so
    the pages and the matrix never all sit in memory together."""
    parts = [_Page.of(page) for page in pages if page]
    if not parts:
        raise ValueError("no logged events: nothing has been learned from feedback yet")
    dims = {part.X.shape[1] for part in parts}
    if len(dims) > 1:
        raise ValueError(f"logged events of several feature dimensions {sorted(dims)}")
    X = np.empty((sum(len(part.X) for part in parts), dims.pop()), dtype=np.float64)
    row = 0
    for part in parts:
        X[row : row + len(part.X)] = part.X
        row += len(part.X)
        part.X = X[:0]  # the page's copy goes now, not when the list does
    counts = np.concatenate([part.counts for part in parts])
    return LoggedBandit(
        X=X,
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        pscore=np.concatenate([part.pscore for part in parts]),
        chosen=np.concatenate([part.chosen for part in parts]),
        reward=np.concatenate([part.reward for part in parts]),
        event_id=np.concatenate([part.event_id for part in parts]).astype(str),
        timestamp=np.concatenate([part.timestamp for part in parts]),
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
    features = np.stack([upgrade.vector(row) for row in event.features])
    return replace(event, features=features, feature_version=feature_version)


def on_layout(events: Sequence[LoggedEvent], feature_version: str) -> list[LoggedEvent]:
    """The events made on ``feature_version``'s layout, with those of an earlier layout
    that carries over into it (features.EARLIER_LAYOUTS) moved onto it, as serving learns
    them; the rest are skipped with a warning (a reward model or a policy needs one layout)."""
    kept, upgraded = _on_layout(events, feature_version)
    _report_layouts(upgraded, len(events) - len(kept), len(events), feature_version)
    return kept


def _on_layout(
    events: Sequence[LoggedEvent], feature_version: str
) -> tuple[list[LoggedEvent], int]:
    """(:func:`on_layout`'s events, how many of them were carried over), quietly."""
    kept: list[LoggedEvent] = []
    upgraded = 0
    for event in events:
        moved = carried_over(event, feature_version)
        if moved is not None:
            kept.append(moved)
            upgraded += moved is not event
    return kept, upgraded


def _report_layouts(upgraded: int, skipped: int, total: int, feature_version: str) -> None:
    if upgraded:
        logger.info(
            "%d logged decisions made on an earlier feature layout are carried over to %s, "
            "the features added since at 0",
            upgraded,
            feature_version,
        )
    if skipped:
        logger.warning(
            "skipped %d of %d logged decisions made on other feature layouts than %s",
            skipped,
            total,
            feature_version,
        )


def load_training_log(
    store: DecisionStore,
    *,
    feature_version: str,
    log_filter: LogFilter = EVERYTHING,
    source: str = "decision log",
) -> TrainingLog:
    """Like :func:`load_log`, keeping only decisions made on ``feature_version``'s layout;
    the log is read a page at a time (:func:`from_pages`)."""
    through = upgraded = skipped = total = 0

    def kept_pages() -> Iterator[list[LoggedEvent]]:
        nonlocal through, upgraded, skipped, total
        for page in store.logged_event_pages(log_filter):
            kept, moved = _on_layout(page, feature_version)
            through = max([through, *(e.reward_id for e in kept)])
            upgraded, skipped, total = (
                upgraded + moved,
                skipped + len(page) - len(kept),
                total + len(page),
            )
            yield kept

    try:
        log = from_pages(kept_pages())
    finally:
        _report_layouts(upgraded, skipped, total, feature_version)
    return TrainingLog(
        log=log, spec_version=feature_version, trained_through_reward_id=through, source=source
    )
