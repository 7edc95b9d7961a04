"""Pseudonymous keys: user ids and task ids never reach the store in clear."""

from __future__ import annotations

import hashlib
import hmac


def pseudonymise(secret: str, value: str, *, namespace: str) -> str:
    """HMAC-SHA256 of ``value``: stable for joins, useless without the secret.

    ``namespace`` keeps a user id and a task id with the same text from colliding.
    """
    message = f"{namespace}\x1f{value}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()[:32]
