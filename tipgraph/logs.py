"""Structured logs: tipgraph's module loggers write into Serve's per-replica log file.

Serve sets up one logger, ``ray.serve``, per replica from the deployment's
``logging_config`` (``logs`` settings): JSON lines in ``logs/serve/`` with the replica,
the deployment and, during a request, its ``request_id``.  Loggers of other names go to
the worker's stderr file instead, as unstructured text.  :func:`route_to_serve_log` sends
tipgraph's loggers to Serve's handlers, so every line tipgraph writes is one of those
JSON objects; an ``extra={"event_id": ...}`` on the call becomes an ``event_id`` field.

What is logged about a request names it by ``event_id`` and never carries the user id,
task text or tip content (tests/test_metrics.py greps a real app's log files for them).
"""

from __future__ import annotations

import logging

from tipgraph.periodic import Periodic
from tipgraph.settings import LogSettings

SERVE_LOGGER = "ray.serve"
APP_LOGGERS = ("tipgraph", "deployments", "graphs")


class _ToServeLog(logging.Handler):
    """Hands each record to Serve's logger, whose handlers add the replica and request
    context, format it and write the file."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(SERVE_LOGGER).handle(record)


def route_to_serve_log(level: str) -> None:
    """Send tipgraph's loggers, from ``level`` up, to Serve's log file only (idempotent)."""
    for name in APP_LOGGERS:
        app_logger = logging.getLogger(name)
        app_logger.setLevel(level)
        # Not also to the worker's stderr file: one place, one format.
        app_logger.propagate = False
        if not any(isinstance(h, _ToServeLog) for h in app_logger.handlers):
            app_logger.addHandler(_ToServeLog())


def flush_serve_log() -> None:
    """Write the lines Serve has buffered (up to 1000 in throughput mode, flushed
    by Serve only when full or on an ERROR line)."""
    for handler in logging.getLogger(SERVE_LOGGER).handlers:
        handler.flush()


class ReplicaLogs:
    """A replica's logging: routed to Serve's file, flushed every ``flush_interval_s``
    and on :meth:`close` (graceful shutdown), so a quiet replica's lines are not held
    back and a stopping one's are not lost."""

    def __init__(self, settings: LogSettings) -> None:
        self._level = settings.level
        self._flusher = Periodic(settings.flush_interval_s, flush_serve_log, name="log-flush")

    def start(self) -> ReplicaLogs:
        route_to_serve_log(self._level)
        self._flusher.start()
        return self

    def close(self) -> None:
        self._flusher.stop()
        flush_serve_log()
