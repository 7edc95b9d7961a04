"""Export the decision log to CSV or Parquet, in the format :mod:`tuning.importer` reads.

One row per candidate of every decision with a learned reward: ``event_id``,
``timestamp`` (ISO 8601, UTC), ``chosen`` (0/1), ``pscore`` (the served policy's
probability of the row), ``reward`` (on the chosen row), ``x_<feature>`` (the joint features
the policy scored), and ``meta_*`` columns the importer ignores (policy, prompt version,
reward source, feature version).  An exported file imports back to the same events.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pandas as pd

from tipgraph.features import FEATURE_SPEC
from tipgraph.store import EVERYTHING, DecisionStore, LogFilter
from tipgraph.store.records import LoggedEvent
from tuning.data import carried_over

FORMATS = (".csv", ".parquet")
PROGRESS_EVERY = 1000


def parse_timestamp(value: str | None, flag: str) -> datetime | None:
    """A ``--since`` / ``--until`` argument (ISO 8601); None when the flag was not given."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as err:
        raise ValueError(f"{flag} must be an ISO 8601 timestamp, got {value!r} ({err})") from err


def _feature_columns(events: list[LoggedEvent]) -> list[str]:
    dims = {len(e.features[0]) for e in events}
    if len(dims) > 1:
        versions = sorted({e.feature_version for e in events})
        raise ValueError(
            f"the selected decisions use {len(dims)} feature layouts ({', '.join(versions)}); "
            "choose one with --feature-version"
        )
    dim = dims.pop()
    names = FEATURE_SPEC.names if dim == FEATURE_SPEC.dim else [str(i) for i in range(dim)]
    return [f"x_{name}" for name in names]


def events_frame(
    events: list[LoggedEvent], on_progress: Callable[[int, int], None] | None = None
) -> pd.DataFrame:
    """The long table: one row per candidate, events in time order; ``on_progress(done,
    total)`` after every ``PROGRESS_EVERY`` events and at the end."""
    if not events:
        raise ValueError("no logged decisions match: nothing to export")
    features = _feature_columns(events)
    rows = []
    for done, e in enumerate(events, start=1):
        if on_progress is not None and (done % PROGRESS_EVERY == 0 or done == len(events)):
            on_progress(done, len(events))
        timestamp = e.created_at.isoformat()
        for i, (x, p) in enumerate(zip(e.features, e.probabilities, strict=True)):
            chosen = i == e.chosen
            row = {
                "event_id": e.event_id,
                "timestamp": timestamp,
                "chosen": int(chosen),
                "pscore": p,
                "reward": e.reward if chosen else None,
                "meta_policy_name": e.policy_name,
                "meta_prompt_version": e.prompt_version,
                "meta_reward_source": e.reward_source,
                "meta_feature_version": e.feature_version,
            }
            row.update(zip(features, x, strict=True))
            rows.append(row)
    return pd.DataFrame(rows)


def export_log(
    store: DecisionStore,
    out: Path,
    *,
    log_filter: LogFilter = EVERYTHING,
    feature_version: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Write the selected decisions to ``out`` (.csv or .parquet); (events, rows) written."""
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"{out}: expected a .csv or .parquet file, got {out.suffix or 'none'}")
    events = store.logged_events(log_filter)
    if feature_version is not None:
        events = [e for e in events if e.feature_version == feature_version]
    else:
        # As tuning reads them: an earlier layout's decisions on the current layout.
        events = [carried_over(e, FEATURE_SPEC.version) or e for e in events]
    frame = events_frame(events, on_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)
    return len(events), len(frame)
