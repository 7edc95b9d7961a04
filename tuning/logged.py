"""A logged contextual-bandit dataset whose events each offer their own number of candidates.

Candidates change with every request, so the log cannot be a dense (n_events, n_actions)
table.  Instead all candidates of all events are stacked row-wise, and ``offsets`` says
which rows belong to which event (the CSR layout)::

    event i  ->  rows offsets[i] : offsets[i + 1]      (K_i = offsets[i + 1] - offsets[i])

``pscore`` holds the logging policy's probability of *every* candidate, not only of the
chosen one: estimators use the full distribution (for the exact bias of clipping, for a
support check), and a uniform logging policy can be recognised from it.

Every array is validated once, in :meth:`LoggedBandit.__post_init__`; the estimators in
:mod:`tuning.ope` trust a :class:`LoggedBandit` they are given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROBABILITY_TOLERANCE = 1e-6


class LogValidationError(ValueError):
    """A logged array of the wrong shape, or values no logging policy could have produced."""


def readonly(arr: np.ndarray) -> np.ndarray:
    """A read-only view: the caller's array keeps its own flags."""
    view = arr.view()
    view.flags.writeable = False
    return view


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def event_of_row(offsets: np.ndarray, row: int) -> int:
    """The event that owns candidate row ``row``."""
    return int(np.searchsorted(offsets, row, side="right")) - 1


def check_distribution(p: np.ndarray, offsets: np.ndarray, name: str) -> np.ndarray:
    """``p`` as float64 of shape (offsets[-1],), in [0, 1] and summing to 1 per event.

    ``name`` is the argument reported in errors (``pscore``, ``action_dist``).
    """
    arr = np.asarray(p, dtype=np.float64)
    n_rows = int(offsets[-1])
    if arr.shape != (n_rows,):
        raise LogValidationError(
            f"{name} must have shape (n_candidates_total,) = ({n_rows},), got {arr.shape}"
        )
    bad = ~np.isfinite(arr) | (arr < 0.0) | (arr > 1.0)
    if bad.any():
        row = _first(bad)
        event = event_of_row(offsets, row)
        raise LogValidationError(
            f"{name}[{row}] (event {event}) must be a probability in [0, 1], got {arr[row]}"
        )
    totals = np.add.reduceat(arr, offsets[:-1])
    off = np.abs(totals - 1.0) > PROBABILITY_TOLERANCE
    if off.any():
        event = _first(off)
        raise LogValidationError(
            f"{name} of event {event} must sum to 1 (within {PROBABILITY_TOLERANCE}), "
            f"got {float(totals[event])}"
        )
    return arr


def _check_offsets(offsets: np.ndarray, n_rows: int) -> np.ndarray:
    arr = np.asarray(offsets)
    if arr.ndim != 1 or arr.shape[0] < 2 or arr.dtype.kind not in "iu":
        raise LogValidationError(
            f"offsets must be an integer array of shape (n_events + 1,) with n_events >= 1, "
            f"got dtype {arr.dtype} and shape {arr.shape}"
        )
    arr = arr.astype(np.int64)
    if arr[0] != 0 or arr[-1] != n_rows:
        raise LogValidationError(
            f"offsets must start at 0 and end at len(X) = {n_rows}, "
            f"got {int(arr[0])} and {int(arr[-1])}"
        )
    empty = np.diff(arr) < 1
    if empty.any():
        event = _first(empty)
        raise LogValidationError(
            f"offsets must be strictly increasing (every event needs >= 1 candidate); "
            f"event {event} has {int(arr[event + 1] - arr[event])}"
        )
    return arr


def _check_timestamp(timestamp: np.ndarray, n_events: int) -> np.ndarray:
    arr = np.asarray(timestamp)
    if arr.shape != (n_events,):
        raise LogValidationError(
            f"timestamp must have shape (n_events,) = ({n_events},), got {arr.shape}"
        )
    if arr.dtype.kind == "M":
        arr = arr.astype("datetime64[us]")
        missing = np.isnat(arr)
    elif arr.dtype.kind in "iuf":
        arr = arr.astype(np.float64)
        missing = ~np.isfinite(arr)
    else:
        raise LogValidationError(
            f"timestamp must be datetime64 or float seconds, got dtype {arr.dtype}"
        )
    if missing.any():
        raise LogValidationError(f"timestamp of event {_first(missing)} is missing (NaT or NaN)")
    backwards = arr[1:] < arr[:-1]
    if backwards.any():
        event = _first(backwards) + 1
        raise LogValidationError(
            f"timestamp must be non-decreasing (the log is time-ordered); "
            f"event {event} is earlier than event {event - 1}"
        )
    return arr


def _check_event_id(event_id: np.ndarray, n_events: int) -> np.ndarray:
    arr = np.asarray(event_id)
    if arr.shape != (n_events,):
        raise LogValidationError(
            f"event_id must have shape (n_events,) = ({n_events},), got {arr.shape}"
        )
    if arr.dtype.kind == "O" and all(isinstance(e, str) for e in arr):
        arr = arr.astype(str)
    if arr.dtype.kind != "U":
        raise LogValidationError(f"event_id must hold strings, got dtype {arr.dtype}")
    unique, first_index = np.unique(arr, return_index=True)
    if len(unique) != n_events:
        repeated = np.ones(n_events, dtype=bool)
        repeated[first_index] = False
        event = _first(repeated)
        raise LogValidationError(
            f"event_id of event {event} repeats an earlier id {str(arr[event])!r}"
        )
    return arr


@dataclass(frozen=True, eq=False)
class LoggedBandit:
    """A time-ordered bandit log; event i owns candidate rows offsets[i]:offsets[i+1].

    Fields (N = n_candidates_total = Σ_i K_i, n = n_events):

    * ``X``: array of shape (N, d), every candidate's joint features, stacked by event.
    * ``offsets``: integer array of shape (n + 1,), 0 = offsets[0] < ... < offsets[n] = N.
    * ``pscore``: array of shape (N,), the logging policy's probability μ(a | x_i) of every
      candidate; each event's probabilities sum to 1.
    * ``chosen``: integer array of shape (n,), the logged action a_i as an index *within*
      its event, 0 <= a_i < K_i, with μ(a_i | x_i) > 0.
    * ``reward``: array of shape (n,), the observed reward r_i.
    * ``event_id``: array of shape (n,) of unique strings.
    * ``timestamp``: array of shape (n,), datetime64[us] or float seconds, non-decreasing.

    All arrays are stored as read-only views in canonical dtypes.
    """

    X: np.ndarray
    offsets: np.ndarray
    pscore: np.ndarray
    chosen: np.ndarray
    reward: np.ndarray
    event_id: np.ndarray
    timestamp: np.ndarray
    n_candidates: np.ndarray = field(init=False, repr=False)
    """K_i, integer array of shape (n,)."""
    chosen_rows: np.ndarray = field(init=False, repr=False)
    """Row of each event's chosen candidate in ``X`` / ``pscore``, shape (n,)."""

    def __post_init__(self) -> None:
        X = np.asarray(self.X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] == 0:
            raise LogValidationError(
                f"X must have shape (n_candidates_total, d >= 1), got {X.shape}"
            )
        bad_rows = np.asarray(~np.isfinite(X).all(axis=1))
        offsets = _check_offsets(self.offsets, X.shape[0])
        if bad_rows.any():
            row = _first(bad_rows)
            event = event_of_row(offsets, row)
            raise LogValidationError(f"X row {row} (event {event}) has NaN or infinite values")
        n = len(offsets) - 1
        pscore = check_distribution(self.pscore, offsets, "pscore")

        chosen = np.asarray(self.chosen)
        if chosen.shape != (n,) or chosen.dtype.kind not in "iu":
            raise LogValidationError(
                f"chosen must be an integer array of shape (n_events,) = ({n},), "
                f"got dtype {chosen.dtype} and shape {chosen.shape}"
            )
        chosen = chosen.astype(np.int64)
        n_candidates = np.diff(offsets)
        out_of_range = (chosen < 0) | (chosen >= n_candidates)
        if out_of_range.any():
            event = _first(out_of_range)
            raise LogValidationError(
                f"chosen[{event}] = {int(chosen[event])} is outside the event's "
                f"{int(n_candidates[event])} candidates"
            )
        chosen_rows = offsets[:-1] + chosen
        impossible = pscore[chosen_rows] <= 0.0
        if impossible.any():
            event = _first(impossible)
            raise LogValidationError(
                f"pscore of the chosen candidate of event {event} is 0: "
                f"the logging policy could not have chosen it"
            )

        reward = np.asarray(self.reward, dtype=np.float64)
        if reward.shape != (n,):
            raise LogValidationError(
                f"reward must have shape (n_events,) = ({n},), got {reward.shape}"
            )
        if not np.isfinite(reward).all():
            raise LogValidationError(
                f"reward of event {_first(~np.isfinite(reward))} is NaN or infinite"
            )
        event_id = _check_event_id(self.event_id, n)
        timestamp = _check_timestamp(self.timestamp, n)

        for name, value in (
            ("X", X),
            ("offsets", offsets),
            ("pscore", pscore),
            ("chosen", chosen),
            ("reward", reward),
            ("event_id", event_id),
            ("timestamp", timestamp),
            ("n_candidates", n_candidates),
            ("chosen_rows", chosen_rows),
        ):
            object.__setattr__(self, name, readonly(value))

    @property
    def n_events(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_rows(self) -> int:
        """N, the number of candidates over all events."""
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    def event(self, i: int) -> tuple[np.ndarray, np.ndarray, int, float]:
        """(X_i of shape (K_i, d), μ(· | x_i) of shape (K_i,), a_i, r_i) of event ``i``."""
        if not -self.n_events <= i < self.n_events:
            raise IndexError(f"event {i} is outside the log's {self.n_events} events")
        i %= self.n_events
        rows = slice(int(self.offsets[i]), int(self.offsets[i + 1]))
        return self.X[rows], self.pscore[rows], int(self.chosen[i]), float(self.reward[i])

    def seconds(self) -> np.ndarray:
        """Event times as Unix seconds, shape (n,): what a forgetting policy weighs by."""
        if self.timestamp.dtype.kind == "M":
            return self.timestamp.astype("datetime64[us]").astype(np.int64) / 1e6
        return np.asarray(self.timestamp, dtype=np.float64)

    def chosen_features(self) -> np.ndarray:
        """x_{i, a_i}, array of shape (n_events, d)."""
        return self.X[self.chosen_rows]

    def chosen_pscore(self) -> np.ndarray:
        """μ(a_i | x_i), array of shape (n_events,)."""
        return self.pscore[self.chosen_rows]

    def per_event_sum(self, values: np.ndarray) -> np.ndarray:
        """Σ over each event's candidates of ``values`` (shape (N,)): shape (n_events,)."""
        return np.add.reduceat(values, self.offsets[:-1])

    def subset(self, mask: np.ndarray) -> LoggedBandit:
        """The events where ``mask`` (boolean, shape (n_events,)) is true, in order."""
        keep = np.asarray(mask)
        if keep.shape != (self.n_events,) or keep.dtype != np.bool_:
            raise LogValidationError(
                f"mask must be a boolean array of shape (n_events,) = ({self.n_events},), "
                f"got dtype {keep.dtype} and shape {keep.shape}"
            )
        if not keep.any():
            raise LogValidationError("mask selects no events; a log needs at least one")
        rows = np.repeat(keep, self.n_candidates)
        return LoggedBandit(
            X=self.X[rows],
            offsets=np.concatenate([[0], np.cumsum(self.n_candidates[keep])]),
            pscore=self.pscore[rows],
            chosen=self.chosen[keep],
            reward=self.reward[keep],
            event_id=self.event_id[keep],
            timestamp=self.timestamp[keep],
        )
