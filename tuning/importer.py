"""Import a bandit log from another system: CSV or Parquet, one row per candidate.

The format (docs/tuning.md, "Importing a log") is long: every row is one candidate of one
event, and an event is all the rows that share an ``event_id``.

=============  ========================================================================
column         meaning
=============  ========================================================================
event_id       the event (decision) this candidate belongs to; required
timestamp      when the event was decided: ISO 8601 or Unix seconds; equal on its rows
chosen         1 on the row of the action that was taken, 0 on the others
pscore         the logging policy's probability of this row's action; required on the
               chosen row, and either on every row of the event (summing to 1) or on
               none of the others (the remaining mass is then spread evenly)
reward         the observed reward; required on the chosen row, ignored on the others
action         optional action id (a string): joint features get one block per action
ctx_<name>     a context feature, equal on every row of the event
act_<name>     a feature of this row's action (candidate)
x_<name>       a joint feature, used as given (cannot be mixed with ctx_ / act_)
meta_<name>    ignored: context for people (``tipgraph export`` writes the policy, prompt
               version, reward source and feature version here)
=============  ========================================================================

The joint vector a policy learns on is ``x_*`` when given.  Otherwise it is built like
tipgraph's own (:mod:`tipgraph.features`): ``ctx ⊗ onehot(action)`` when there is an
``action`` column, ``ctx ⊗ act`` when there is not, followed by ``act``.  Its
``spec_version`` hashes the joint feature names, so a model tuned on an imported log is
never served against tipgraph's own features by mistake.

Any problem fails with a :class:`LogImportError` naming the row (1-based, as a spreadsheet
shows it; for CSV also the file line) and the column.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tuning.logged import LoggedBandit

REQUIRED = ("event_id", "timestamp", "chosen", "pscore", "reward")
FEATURE_PREFIXES = ("ctx_", "act_", "x_")
MAX_ACTIONS = 100
"""More distinct actions than this would make ctx ⊗ onehot(action) too wide to learn on."""


class LogImportError(ValueError):
    """A file that is not a valid bandit log; the message names the row and column."""


@dataclass(frozen=True)
class ImportedLog:
    log: LoggedBandit
    feature_names: tuple[str, ...]
    spec_version: str


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise LogImportError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # Everything as text: parsing is ours, so errors can name the row.
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise LogImportError(f"{path}: cannot be read as {suffix[1:]}: {err}") from err
    raise LogImportError(f"{path}: expected a .csv or .parquet file, got {suffix or 'no suffix'}")


class _Locator:
    """Turns a row index into 'row 7 (line 8)' (CSV) or 'row 7' (Parquet)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.csv = path.suffix.lower() == ".csv"

    def __call__(self, index: int, column: str) -> str:
        line = f" (line {index + 2})" if self.csv else ""
        return f"{self.path.name} row {index + 1}{line}, column {column!r}"


def _blank(values: pd.Series) -> np.ndarray:
    missing = values.isna().to_numpy(copy=True)
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        missing |= values.astype(str).str.strip().eq("").to_numpy()
    return missing


def _numbers(df: pd.DataFrame, column: str, where: _Locator, *, required: bool) -> np.ndarray:
    """``column`` as float64; NaN where blank (allowed only if not ``required``)."""
    raw = df[column]
    blank = _blank(raw)
    parsed = pd.to_numeric(raw.where(~blank), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~blank & ~np.isfinite(parsed)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LogImportError(f"{where(i, column)}: expected a finite number, got {raw.iloc[i]!r}")
    if required and blank.any():
        i = int(np.flatnonzero(blank)[0])
        raise LogImportError(f"{where(i, column)}: value is missing")
    return parsed


def _timestamps(df: pd.DataFrame, where: _Locator) -> np.ndarray:
    raw = df["timestamp"]
    blank = _blank(raw)
    if blank.any():
        i = int(np.flatnonzero(blank)[0])
        raise LogImportError(f"{where(i, 'timestamp')}: value is missing")
    if pd.api.types.is_datetime64_any_dtype(raw):
        stamps = pd.to_datetime(raw, utc=True)
    else:
        seconds = pd.to_numeric(raw, errors="coerce")
        if seconds.notna().all():
            stamps = pd.to_datetime(seconds, unit="s", utc=True)
        else:
            stamps = pd.to_datetime(raw.astype(str), utc=True, errors="coerce", format="ISO8601")
    bad = stamps.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LogImportError(
            f"{where(i, 'timestamp')}: expected ISO 8601 or Unix seconds, got {raw.iloc[i]!r}"
        )
    return stamps.dt.tz_localize(None).to_numpy(dtype="datetime64[us]")


def _first_row_differing(values: np.ndarray, codes: np.ndarray, first: np.ndarray) -> int | None:
    """The first row whose value differs from its event's first row, or None."""
    differs = values != values[first[codes]]
    if values.ndim > 1:
        differs = differs.any(axis=1)
    return int(np.flatnonzero(differs)[0]) if differs.any() else None


def import_log(path: str | Path) -> ImportedLog:
    """Read ``path`` (.csv or .parquet) in the documented format; see the module docstring."""
    path = Path(path)
    df = read_table(path).reset_index(drop=True)
    where = _Locator(path)
    columns = [str(c) for c in df.columns]
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise LogImportError(f"{path.name}: missing required column(s) {missing}")
    unknown = [
        c
        for c in columns
        if c not in (*REQUIRED, "action") and not c.startswith((*FEATURE_PREFIXES, "meta_"))
    ]
    if unknown:
        raise LogImportError(
            f"{path.name}: unknown column(s) {unknown}; feature columns start with "
            f"{', '.join(FEATURE_PREFIXES)}"
        )
    if df.empty:
        raise LogImportError(f"{path.name}: has a header but no rows")
    ctx = [c for c in columns if c.startswith("ctx_")]
    act = [c for c in columns if c.startswith("act_")]
    joint = [c for c in columns if c.startswith("x_")]
    if joint and (ctx or act):
        raise LogImportError(
            f"{path.name}: x_ columns (joint features) cannot be mixed with ctx_ / act_ columns"
        )
    has_action = "action" in columns
    if not joint and not (act or (ctx and has_action)):
        raise LogImportError(
            f"{path.name}: no features: give x_ columns, act_ columns, or ctx_ columns with an "
            "action column"
        )

    event_raw = df["event_id"].astype(str).str.strip()
    if (empty := event_raw.eq("").to_numpy()).any():
        raise LogImportError(f"{where(int(np.flatnonzero(empty)[0]), 'event_id')}: is empty")
    codes_, uniques = pd.factorize(event_raw)
    codes = np.asarray(codes_, dtype=np.int64)
    n_events = len(uniques)
    first = np.full(n_events, len(df), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(df)))

    timestamp = _timestamps(df, where)
    if (row := _first_row_differing(timestamp, codes, first)) is not None:
        raise LogImportError(
            f"{where(row, 'timestamp')}: differs from the first row of event {event_raw[row]!r}"
        )
    chosen_flag = _numbers(df, "chosen", where, required=True)
    if (bad := ~np.isin(chosen_flag, (0.0, 1.0))).any():
        i = int(np.flatnonzero(bad)[0])
        raise LogImportError(f"{where(i, 'chosen')}: must be 0 or 1, got {df['chosen'].iloc[i]!r}")
    per_event_chosen = np.bincount(codes, weights=chosen_flag, minlength=n_events)
    if (bad := per_event_chosen != 1).any():
        event = int(np.flatnonzero(bad)[0])
        rows = np.flatnonzero((codes == event) & (chosen_flag == 1))
        row = int(rows[1]) if len(rows) > 1 else int(first[event])
        raise LogImportError(
            f"{where(row, 'chosen')}: event {uniques[event]!r} must have exactly one chosen "
            f"row, has {int(per_event_chosen[event])}"
        )
    is_chosen = chosen_flag == 1
    pscore = _numbers(df, "pscore", where, required=False)
    reward = _numbers(df, "reward", where, required=False)
    for name, values in (("pscore", pscore), ("reward", reward)):
        if (gap := is_chosen & np.isnan(values)).any():
            raise LogImportError(
                f"{where(int(np.flatnonzero(gap)[0]), name)}: required on the chosen row"
            )
    if (bad := ~np.isnan(pscore) & ((pscore < 0) | (pscore > 1))).any():
        i = int(np.flatnonzero(bad)[0])
        raise LogImportError(f"{where(i, 'pscore')}: must be in [0, 1], got {pscore[i]}")
    if (bad := is_chosen & (pscore <= 0)).any():
        i = int(np.flatnonzero(bad)[0])
        raise LogImportError(f"{where(i, 'pscore')}: the chosen action's probability must be > 0")

    features, names = _joint_features(df, where, codes, first, ctx, act, joint, has_action)

    # Events in time order (stable: ties keep file order), rows in file order within.
    event_time = timestamp[first]
    event_order = np.argsort(event_time, kind="stable")
    rank = np.empty(n_events, dtype=np.int64)
    rank[event_order] = np.arange(n_events)
    rows = np.lexsort((np.arange(len(df)), rank[codes]))
    sizes = np.bincount(codes, minlength=n_events)[event_order]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    sorted_codes = codes[rows]

    p = pscore[rows]
    given = ~np.isnan(p)
    given_count = np.add.reduceat(given.astype(np.int64), offsets[:-1])
    partial = (given_count != sizes) & (given_count != 1)
    if partial.any():
        event = int(event_order[int(np.flatnonzero(partial)[0])])
        raise LogImportError(
            f"{where(int(first[event]), 'pscore')}: event {uniques[event]!r} gives pscore on "
            f"{int(given_count[np.flatnonzero(partial)[0]])} of its {int(sizes[partial][0])} "
            "rows; give it on every row or only on the chosen one"
        )
    # Only the chosen row given: spread the rest of the mass evenly over the others.
    chosen_p = np.add.reduceat(np.where(is_chosen[rows], p, 0.0), offsets[:-1])
    spread = np.where(sizes > 1, (1.0 - chosen_p) / np.maximum(sizes - 1, 1), 0.0)
    filled = np.where(given, p, np.repeat(spread, sizes))
    totals = np.add.reduceat(filled, offsets[:-1])
    if (off := np.abs(totals - 1.0) > 1e-3).any():
        j = int(np.flatnonzero(off)[0])
        event = int(event_order[j])
        raise LogImportError(
            f"{where(int(first[event]), 'pscore')}: event {uniques[event]!r}'s probabilities "
            f"sum to {totals[j]:.6f}, not 1"
        )
    # Renormalise the small rounding a CSV export leaves (LoggedBandit allows only 1e-6).
    filled = filled / np.repeat(totals, sizes)

    chosen_within = np.flatnonzero(is_chosen[rows]) - offsets[:-1]
    log = LoggedBandit(
        X=features[rows],
        offsets=offsets,
        pscore=filled,
        chosen=chosen_within,
        reward=reward[rows][is_chosen[rows]],
        event_id=np.asarray(uniques, dtype=str)[sorted_codes[offsets[:-1]]],
        timestamp=timestamp[rows][offsets[:-1]],
    )
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:10]
    return ImportedLog(log, tuple(names), f"import-{digest}")


def _joint_features(
    df: pd.DataFrame,
    where: _Locator,
    codes: np.ndarray,
    first: np.ndarray,
    ctx: list[str],
    act: list[str],
    joint: list[str],
    has_action: bool,
) -> tuple[np.ndarray, list[str]]:
    def block(columns: list[str]) -> np.ndarray:
        if not columns:
            return np.zeros((len(df), 0))
        return np.column_stack([_numbers(df, c, where, required=True) for c in columns])

    if joint:
        return block(joint), [c[len("x_") :] for c in joint]
    context, candidate = block(ctx), block(act)
    if (row := _first_row_differing(context, codes, first)) is not None:
        column = next(
            c for j, c in enumerate(ctx) if context[row, j] != context[first[codes[row]], j]
        )
        raise LogImportError(f"{where(row, column)}: context differs from the event's first row")
    ctx_names = [c[len("ctx_") :] for c in ctx]
    act_names = [c[len("act_") :] for c in act]
    if has_action:
        action = df["action"].astype(str).str.strip()
        if (empty := action.eq("").to_numpy()).any():
            raise LogImportError(f"{where(int(np.flatnonzero(empty)[0]), 'action')}: is empty")
        duplicate = pd.Series(list(zip(codes, action, strict=True))).duplicated().to_numpy()
        if duplicate.any():
            i = int(np.flatnonzero(duplicate)[0])
            raise LogImportError(f"{where(i, 'action')}: {action[i]!r} repeats within its event")
        actions = sorted(set(action))
        if len(actions) > MAX_ACTIONS:
            raise LogImportError(
                f"{where(0, 'action')}: {len(actions)} distinct actions (at most {MAX_ACTIONS}); "
                "describe actions with act_ columns instead"
            )
        onehot = (action.to_numpy()[:, None] == np.array(actions)[None, :]).astype(np.float64)
        crossed = (context[:, :, None] * onehot[:, None, :]).reshape(len(df), -1)
        names = [f"{c}*action={a}" for c in ctx_names for a in actions]
    else:
        crossed = (context[:, :, None] * candidate[:, None, :]).reshape(len(df), -1)
        names = [f"{c}*{a}" for c in ctx_names for a in act_names]
    return np.hstack([crossed, candidate]), names + act_names
