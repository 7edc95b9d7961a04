"""The log a sweep tunes on, wherever ``log.source`` says it comes from."""

from __future__ import annotations

from datetime import datetime

import numpy as np

from tipgraph.features import FEATURE_SPEC
from tipgraph.settings import StoreSettings, TipgraphSettings
from tipgraph.store import open_store
from tuning.config import LogSource
from tuning.data import TrainingLog, load_training_log
from tuning.importer import import_log
from tuning.logged import LoggedBandit
from tuning.simulated_log import simulate_log


def read_training_log(log: LogSource, settings: TipgraphSettings) -> TrainingLog:
    """The log ``log`` names: the decision log (filtered), a CSV/Parquet file, or the simulator."""
    if log.source == "file":
        assert log.path is not None  # validated by LogSource
        imported = import_log(log.path)
        data = imported.log
        if log.since is not None or log.until is not None:
            data = _time_window(data, log.since, log.until)
        return TrainingLog(data, imported.spec_version, 0, f"file {log.path}")
    if log.source == "simulator":
        simulated, _ = simulate_log(
            log.logging_policy, n_events=log.events, seed=log.seed, users=log.users
        )
        return TrainingLog(
            simulated,
            FEATURE_SPEC.version,
            0,
            f"simulator ({log.events} events, seed {log.seed}, logged by "
            f"{log.logging_policy.kind})",
        )

    store_settings = log_store_settings(log, settings)
    with open_store(store_settings) as store:
        return load_training_log(
            store,
            feature_version=FEATURE_SPEC.version,
            log_filter=log.log_filter(),
            source=f"decision log {redacted(store_settings.url)}",
        )


def log_store_settings(log: LogSource, settings: TipgraphSettings) -> StoreSettings:
    """The decision log ``log.source: store`` reads: the tipgraph config's, or ``store_url``."""
    if log.store_url is None:
        return settings.store
    return settings.store.model_copy(update={"url": log.store_url})


def redacted(url: str) -> str:
    """A store URL without its password, for logs and MLflow tags."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    return f"{scheme}{sep}{credentials.split(':')[0]}@{host}"


def _time_window(
    data: LoggedBandit, since: datetime | None, until: datetime | None
) -> LoggedBandit:
    stamps = data.timestamp
    keep = np.ones(data.n_events, dtype=bool)
    if since is not None:
        keep &= stamps >= np.datetime64(since.replace(tzinfo=None), "us")
    if until is not None:
        keep &= stamps < np.datetime64(until.replace(tzinfo=None), "us")
    return data.subset(keep)
