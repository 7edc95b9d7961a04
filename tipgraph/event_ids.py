"""Event ids that prove where they came from: 24 random hex digits and a 16-digit MAC.

Feedback names its decision by event id.  An id tipgraph never issued must be refused at
once and without a database read; otherwise made-up ids (10,000 of them cost a client one
second) fill the held-feedback queue and real feedback is turned away.  The MAC is keyed
with the user-key secret, so it verifies with the same keys a replica already has;
retired keys still verify the ids they signed.

Ids issued before signing (32 hex digits, uuid4) stay valid: they are all written by now,
so such an id that is not in the store is unknown, never held.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from typing import Literal

RANDOM_HEX = 24
MAC_HEX = 16
SIGNED = re.compile(rf"[0-9a-f]{{{RANDOM_HEX + MAC_HEX}}}")
LEGACY = re.compile(r"[0-9a-f]{32}")


def _mac(key: str, nonce: str) -> str:
    digest = hmac.new(key.encode(), f"event\x1f{nonce}".encode(), hashlib.sha256).hexdigest()
    return digest[:MAC_HEX]


def new_event_id(key: str) -> str:
    nonce = secrets.token_hex(RANDOM_HEX // 2)
    return nonce + _mac(key, nonce)


def event_id_kind(event_id: str, keys: Sequence[str]) -> Literal["signed", "legacy"] | None:
    """``signed`` for an id one of ``keys`` signed, ``legacy`` for an unsigned id of the old
    form, None for anything tipgraph cannot have issued."""
    if SIGNED.fullmatch(event_id):
        nonce, mac = event_id[:RANDOM_HEX], event_id[RANDOM_HEX:]
        if any(hmac.compare_digest(mac, _mac(key, nonce)) for key in keys):
            return "signed"
        return None
    return "legacy" if LEGACY.fullmatch(event_id) else None
