"""Logged decisions from the decision log (SQLite or Postgres) as a :class:`LoggedBandit`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np

from tipgraph.store import DecisionStore
from tipgraph.store.records import LoggedEvent
from tuning.logged import LoggedBandit


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


def load_log(
    store: DecisionStore,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    prompt_version: str | None = None,
    policy_name: str | None = None,
) -> LoggedBandit:
    """Decisions with a learned reward, time-ordered, with the given filters."""
    return from_events(
        store.logged_events(
            since=since, until=until, prompt_version=prompt_version, policy_name=policy_name
        )
    )
