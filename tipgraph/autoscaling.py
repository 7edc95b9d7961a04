"""What a stage's autoscaler counts: Serve's ongoing requests, or the items in them.

Serve scales a deployment on *ongoing requests*.  The ingress sends each stage batches
(:mod:`tipgraph.batching`), so a stage that waits on something slow (generation on an LLM,
context on the store) shows the autoscaler one request however many users wait in it.  A
stage configured with ``autoscaling.signal: items`` instead reports its items
(:class:`ItemLoad`, through the replica's ``record_autoscaling_stats``), and Serve's
controller runs :func:`scale_on_items` for it.

This module is imported by Serve's controller, pickled by value: it imports nothing but
the standard library, so the controller needs none of tipgraph installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

ITEMS_METRIC = "tipgraph_items"
"""Mean items in a replica (being worked on or waiting inside it) since its last report."""
POLICY_FUNCTION = "tipgraph.autoscaling:scale_on_items"
LAG_METRIC = "tipgraph_lag"
"""The bus consumer's lag as a bus replica last read it (the same for every replica)."""
LAG_POLICY_FUNCTION = "tipgraph.autoscaling:scale_on_lag"


class ItemLoad:
    """Items inside one replica, averaged over time (Little's law: the mean number in the
    system, not a sample that happens to fall between two batches).

    ``report()`` gives the time-weighted mean since the previous report and starts a new
    window; Serve averages the reports again over ``look_back_period_s``.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._items = 0
        self._since = clock()
        self._window_start = self._since
        self._area = 0.0  # item-seconds in the current window

    @property
    def items(self) -> int:
        return self._items

    @contextmanager
    def holding(self, count: int) -> Iterator[None]:
        """Count ``count`` items as inside the replica for the ``with`` block."""
        self.change(count)
        try:
            yield
        finally:
            self.change(-count)

    def report(self) -> dict[str, float]:
        """``{ITEMS_METRIC: mean items since the last report}``, what the replica's
        ``record_autoscaling_stats`` returns."""
        now = self._clock()
        self._advance(now)
        elapsed = now - self._window_start
        mean = self._area / elapsed if elapsed > 0 else float(self._items)
        self._window_start, self._area = now, 0.0
        return {ITEMS_METRIC: mean}

    def change(self, delta: int) -> None:
        """Items entered (``delta`` > 0) or left the replica."""
        self._advance(self._clock())
        self._items += delta

    def _advance(self, now: float) -> None:
        self._area += self._items * (now - self._since)
        self._since = now


def scale_on_items(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve autoscaling policy: replicas = items / ``target_ongoing_requests``.

    ``ctx`` is Ray's ``AutoscalingContext``.  Items are the replicas' reported
    :data:`ITEMS_METRIC` plus the requests queued at handles for a replica (each at least
    one item).  Serve applies ``min_replicas``/``max_replicas``, the up- and downscale
    delays and rounding to what this returns, as for its own policy.
    """
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    reported = ctx.aggregated_metrics.get(ITEMS_METRIC, {})
    items = sum(reported.values()) + ctx.total_queued_requests
    target = ctx.config.get_target_ongoing_requests()
    desired = items / target
    # Replicas that have not reported yet (just started) count as idle, so a slow first
    # report never scales a busy stage down below what it runs.
    if len(reported) < ctx.current_num_replicas and desired < ctx.current_num_replicas:
        desired = float(ctx.current_num_replicas)
    return desired, {"items": round(items, 3)}


def scale_on_lag(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve autoscaling policy: replicas = the bus consumer's lag /
    ``target_ongoing_requests``.

    Every bus replica reads the same lag (the durable consumer's, :data:`LAG_METRIC`),
    so the largest report counts once, not once per replica.  With no report yet the
    deployment keeps what it runs.
    """
    reported = ctx.aggregated_metrics.get(LAG_METRIC, {})
    if ctx.current_num_replicas == 0 or not reported:
        return ctx.target_num_replicas, {}
    lag = max(reported.values())
    return lag / ctx.config.get_target_ongoing_requests(), {"lag": round(lag, 1)}
