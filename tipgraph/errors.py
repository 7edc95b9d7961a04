"""Errors the tip loop raises for its callers: each carries the HTTP status and a message
meant for the client; :func:`describe_error` turns any other error into one loggable line."""

from __future__ import annotations


class TipgraphError(Exception):
    """An error with an HTTP status and a message meant for the caller."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(TipgraphError):
    status_code = 422


class UnknownEvent(TipgraphError):
    status_code = 404


class FeedbackConflict(TipgraphError):
    status_code = 409


class Unavailable(TipgraphError):
    status_code = 503


def describe_error(err: BaseException) -> str:
    """One line naming the root error; a remote error's traceback stays in the logs.

    A replica's exception reaches the caller as a RayTaskError whose text is the remote
    traceback; its last line is the original ``Type: message``.
    """
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1:
        return lines[-1].strip()[:500]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]
