"""One place that wires the runtime objects from settings: the decision store, its writer and
the tip service.  Every entry point (the ingress and scoring deployments, the simulator, the
bench baseline) builds them here, so their defaults live only in ``settings.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tipgraph.decision_log import DecisionLog
from tipgraph.metrics import Metrics
from tipgraph.service import TipService
from tipgraph.settings import StoreSettings, TipgraphSettings
from tipgraph.stages import Stages
from tipgraph.store import DecisionStore, open_store


def decision_log(store: DecisionStore, settings: StoreSettings, *, owner: str) -> DecisionLog:
    """The store's writer with the configured batching, buffer and durability; its
    write-ahead-log segments live under ``spill_dir``, named after ``owner``."""
    return DecisionLog(
        store,
        flush_interval_s=settings.flush_interval_s,
        batch_size=settings.batch_size,
        max_buffered=settings.max_buffered_rows,
        spill_dir=Path(settings.spill_dir),
        owner=owner,
        durability=settings.durability,
        max_spill_bytes=settings.max_spill_bytes,
    )


def tip_service(
    settings: TipgraphSettings,
    stages: Callable[[DecisionStore, DecisionLog, Metrics], Stages],
    *,
    owner: str,
    metrics: Metrics | None = None,
) -> TipService:
    """The tip loop on a newly opened store: ``stages`` builds the stages on that store, its
    writer and the metrics (in process: :class:`~tipgraph.local.LocalStages`, whose shadows
    log through them) or ignores them (Serve handles); ``service.store`` is closed by the
    caller."""
    metrics = metrics if metrics is not None else Metrics()
    store = open_store(settings.store, decision_outbox=settings.bus.decision_events.enabled)
    log = decision_log(store, settings.store, owner=owner)
    return TipService(settings, stages(store, log, metrics), store, log, metrics=metrics)
