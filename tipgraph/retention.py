"""Retention: the decision log keeps ``retention.days`` of what users did, no more.

Decisions older than that go with their candidates (and the task quotes in their texts),
every policy's scores and the feedback, a batch per transaction so writers wait only
briefly.  What the policies learned stays: each reward keeps the features it trained on,
as on erasure (``DecisionStore.erase_users``), so a replica that rebuilds from the rewards
log learns exactly what the others did.  Each ingress replica applies it every
``retention.interval_s``; ``tipgraph retention run`` applies it once.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from tipgraph.metrics import Metrics
from tipgraph.settings import RetentionSettings
from tipgraph.store import DecisionStore, ExpiredRows

logger = logging.getLogger(__name__)


def retention_cutoff(days: int, now: datetime) -> datetime:
    """The oldest time still kept."""
    return now - timedelta(days=days)


def apply_retention(
    store: DecisionStore, *, days: int, now: datetime, batch_size: int
) -> ExpiredRows:
    """Delete everything made before ``now - days``, batch by batch, then what expired
    without a decision; returns what went."""
    before = retention_cutoff(days, now)
    expired = store.drop_expired_partitions(before)
    while True:
        batch = store.delete_expired(before, limit=batch_size)
        expired += batch
        if batch.decisions < batch_size:
            break
    return expired + store.delete_expired_leftovers(before)


class RetentionJob:
    """One replica's periodic retention: :func:`apply_retention` with the settings, counted
    (``tipgraph_retention_deleted``) and logged.  Several replicas may run it at once: the
    store serialises the batches, and a run that finds nothing deletes nothing."""

    def __init__(self, store: DecisionStore, settings: RetentionSettings, metrics: Metrics) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics

    def run(self) -> ExpiredRows:
        now = datetime.now(UTC)
        self._store.maintain_partitions(now)
        days = self._settings.days
        if days is None:
            return ExpiredRows()
        expired = apply_retention(
            self._store,
            days=days,
            now=now,
            batch_size=self._settings.batch_size,
        )
        self._metrics.retention_deleted(expired)
        if expired != ExpiredRows():
            logger.info(
                "retention (%d days): deleted %d decisions, %d feedback, %d policy runs, "
                "%d embeddings",
                days,
                expired.decisions,
                expired.feedback,
                expired.policy_runs,
                expired.embeddings,
            )
        return expired
