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
from typing import IO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tipgraph.features import FEATURE_SPEC
from tipgraph.store import EVERYTHING, DecisionStore, LogFilter
from tipgraph.store.records import LoggedEvent
from tuning.data import carried_over

FORMATS = (".csv", ".parquet")


def parse_timestamp(value: str | None, flag: str) -> datetime | None:
    """A ``--since`` / ``--until`` argument (ISO 8601); None when the flag was not given."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError as err:
        raise ValueError(f"{flag} must be an ISO 8601 timestamp, got {value!r} ({err})") from err


def _feature_columns(dim: int) -> list[str]:
    names = FEATURE_SPEC.names if dim == FEATURE_SPEC.dim else [str(i) for i in range(dim)]
    return [f"x_{name}" for name in names]


def _check_one_layout(events: list[LoggedEvent], dim: int | None) -> int:
    """The one feature dimension of ``events`` (and of the pages before, ``dim``)."""
    dims = {len(e.features[0]) for e in events} | ({dim} if dim is not None else set())
    if len(dims) > 1:
        versions = sorted({e.feature_version for e in events})
        raise ValueError(
            f"the selected decisions use {len(dims)} feature layouts ({', '.join(versions)}); "
            "choose one with --feature-version"
        )
    return dims.pop()


_TEXT_COLUMNS = (
    "event_id",
    "timestamp",
    "meta_policy_name",
    "meta_prompt_version",
    "meta_reward_source",
    "meta_feature_version",
)


def _events_frame(events: list[LoggedEvent], dim: int) -> pd.DataFrame:
    """The long table of ``events`` (of ``dim`` features each): one row per candidate, in
    the events' order.  Column types do not depend on the values, so the frames of
    successive pages append."""
    n = [len(e.features) for e in events]
    chosen = np.concatenate([np.arange(k) == e.chosen for k, e in zip(n, events, strict=True)])
    reward = np.repeat([e.reward for e in events], n)
    frame = pd.DataFrame(
        {
            "event_id": np.repeat([e.event_id for e in events], n),
            "timestamp": np.repeat([e.created_at.isoformat() for e in events], n),
            "chosen": chosen.astype(np.int64),
            "pscore": np.concatenate([e.probabilities for e in events]).astype(np.float64),
            "reward": np.where(chosen, reward, np.nan),
            "meta_policy_name": np.repeat([e.policy_name for e in events], n),
            "meta_prompt_version": np.repeat(
                np.array([e.prompt_version for e in events], dtype=object), n
            ),
            "meta_reward_source": np.repeat([e.reward_source for e in events], n),
            "meta_feature_version": np.repeat([e.feature_version for e in events], n),
        }
    )
    features = pd.DataFrame(
        np.concatenate([e.features for e in events]), columns=_feature_columns(dim)
    )
    frame = pd.concat([frame, features], axis=1)
    return frame.astype({column: "string" for column in _TEXT_COLUMNS})


class _Writer:
    """Appends frames to a CSV or Parquet file, the first frame's columns setting the
    header and schema."""

    def __init__(self, path: Path, *, csv: bool) -> None:
        self.path = path
        self.csv = csv
        self._csv: IO[str] | None = None
        self._parquet: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    def write(self, frame: pd.DataFrame) -> None:
        if self.csv:
            header = self._csv is None  # the first frame's
            if self._csv is None:
                self._csv = self.path.open("w", newline="", encoding="utf-8")
            frame.to_csv(self._csv, index=False, header=header)
            return
        table = pa.Table.from_pandas(frame, schema=self._schema, preserve_index=False)
        if self._parquet is None:
            self._schema = table.schema
            self._parquet = pq.ParquetWriter(self.path, self._schema)
        self._parquet.write_table(table)

    def close(self) -> None:
        """Idempotent."""
        if self._csv is not None:
            self._csv.close()
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None


def export_log(
    store: DecisionStore,
    out: Path,
    *,
    log_filter: LogFilter = EVERYTHING,
    feature_version: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Write the selected decisions to ``out`` (.csv or .parquet), a page of the log at a
    time, so memory does not grow with the log; (events, rows) written.  ``on_progress``
    gets the events written so far after each page.  The file appears whole or not at
    all: it is written beside ``out`` and moved there at the end."""
    if out.suffix.lower() not in FORMATS:
        raise ValueError(f"{out}: expected a .csv or .parquet file, got {out.suffix or 'none'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    writer = _Writer(partial, csv=out.suffix.lower() == ".csv")
    events = rows = 0
    dim: int | None = None
    try:
        for page in store.logged_event_pages(log_filter):
            if feature_version is not None:
                page = [e for e in page if e.feature_version == feature_version]
            else:
                # As tuning reads them: an earlier layout's decisions on the current layout.
                page = [carried_over(e, FEATURE_SPEC.version) or e for e in page]
            if not page:
                continue
            dim = _check_one_layout(page, dim)
            frame = _events_frame(page, dim)
            writer.write(frame)
            events, rows = events + len(page), rows + len(frame)
            if on_progress is not None:
                on_progress(events)
        writer.close()
        if not events:
            raise ValueError("no logged decisions match: nothing to export")
        partial.replace(out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return events, rows
