"""API credentials: bearer tokens with ids and scopes, kept as hashes, reloaded when changed.

A token file (``auth.tokens_file``; on k3s a mounted Secret) lists the valid tokens as a
YAML list, one entry per token (``tipgraph token new >> tokens.yaml`` appends one)::

    - id: recommender-2026-12
      sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
      scopes: [tips, feedback]
      not_after: 2027-01-05T00:00:00Z   # optional: refused from then on

A mapping ``{tokens: [...]}`` is read too; entries appended below it would not be.

Only the SHA-256 of a token is stored: a leaked file names no usable credential.  Tokens
are random (``tipgraph token new``), so an unsalted hash is as strong as the token.  The
file is re-read when its modification time, size or inode changes (a Kubernetes Secret
volume swaps a symlink), checked at most every ``auth.reload_interval_s``: a rotation
adds the new token, waits until every client uses it, then removes the old one, and no
request fails in between.  A file that no longer parses is refused and the tokens already
loaded stay in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tipgraph.settings import AuthSettings

logger = logging.getLogger(__name__)

Scope = Literal["tips", "feedback", "erase", "admin"]
"""What a token may do: ``tips`` POST /v1/tips, ``feedback`` POST /v1/feedback, ``erase``
DELETE /v1/users/{id}; ``admin`` everything."""
SCOPES: tuple[Scope, ...] = get_args(Scope)
ENV_TOKEN_ID = "env"
"""The id of ``auth.api_token`` (``$TIPGRAPH_API_TOKEN``), which has every scope."""
TOKEN_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class TokenFileError(ValueError):
    """The token file is missing, unreadable or invalid; the message says where."""


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token: what a token file stores."""
    return hashlib.sha256(token.encode()).hexdigest()


def required_scope(method: str, path: str) -> Scope:
    """The scope a request needs, from its method and path below the route prefix."""
    if path == "/v1/tips" and method == "POST":
        return "tips"
    if path == "/v1/feedback" and method == "POST":
        return "feedback"
    if path.startswith("/v1/users/") and method == "DELETE":
        return "erase"
    return "admin"


class _TokenEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=TOKEN_ID_PATTERN)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: tuple[Scope, ...] = Field(min_length=1)
    not_after: datetime | None = None

    @field_validator("not_after")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("not_after needs a time zone, e.g. 2027-01-05T00:00:00Z")
        return value


class _TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[_TokenEntry]


@dataclass(frozen=True, slots=True)
class Credential:
    """One valid token, by id: what it may do and until when."""

    id: str
    digest: bytes
    scopes: frozenset[Scope]
    not_after: float | None = None
    """Unix time from which the token is refused; None: until it leaves the file."""

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or "admin" in self.scopes


class Credentials:
    """The tokens valid at one moment; immutable, replaced whole on a reload."""

    def __init__(self, credentials: Sequence[Credential]) -> None:
        ids = [c.id for c in credentials]
        duplicated = sorted({i for i in ids if ids.count(i) > 1})
        if duplicated:
            raise TokenFileError(f"token ids must be unique; repeated: {', '.join(duplicated)}")
        digests = [c.digest for c in credentials]
        if len(set(digests)) != len(digests):
            raise TokenFileError("two token entries have the same sha256: one token, one id")
        self._credentials = tuple(credentials)

    def __len__(self) -> int:
        return len(self._credentials)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self._credentials)

    def authenticate(self, presented: str, now: float | None = None) -> Credential | None:
        """The credential whose token was presented, or None.

        Every entry is compared, in constant time, whatever matches: how long this takes
        says nothing about which entry, or how much of a hash, matched.
        """
        digest = hashlib.sha256(presented.encode()).digest()
        found: Credential | None = None
        for credential in self._credentials:
            if hmac.compare_digest(digest, credential.digest):
                found = credential
        if found is None or found.not_after is None:
            return found
        return found if (time.time() if now is None else now) < found.not_after else None


def parse_token_file(text: str, *, where: str) -> list[Credential]:
    """The credentials a token file's text lists; :class:`TokenFileError` naming the fault."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise TokenFileError(f"{where}: not YAML: {err}") from err
    if isinstance(raw, list):  # entries appended by `tipgraph token new >> tokens.yaml`
        raw = {"tokens": raw}
    try:
        parsed = _TokenFile.model_validate(raw if raw is not None else {"tokens": []})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "file"
        raise TokenFileError(f"{where}: {field}: {first['msg']}") from err
    return [
        Credential(
            id=entry.id,
            digest=bytes.fromhex(entry.sha256),
            scopes=frozenset(entry.scopes),
            not_after=None if entry.not_after is None else entry.not_after.timestamp(),
        )
        for entry in parsed.tokens
    ]


def _env_credential(settings: AuthSettings) -> list[Credential]:
    if settings.api_token is None or not settings.api_token.get_secret_value():
        return []
    digest = hashlib.sha256(settings.api_token.get_secret_value().encode()).digest()
    return [Credential(ENV_TOKEN_ID, digest, frozenset(SCOPES))]


def _signature(path: Path) -> tuple[int, int, int]:
    stat = os.stat(path)  # follows symlinks: a Secret volume's update swaps one
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class CredentialSource:
    """The credentials in force: ``auth.api_token`` plus the token file, reloaded on change.

    :meth:`current` is called on every request; it looks at the file at most every
    ``reload_interval_s`` and re-reads it only when the file changed.  Construction fails
    (:class:`TokenFileError`) when there is no token at all or the file is invalid: the
    ingress must not start open, or closed to everybody.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_reload: Callable[[str], None] | None = None,
    ) -> None:
        self._env = _env_credential(settings)
        self._path = None if settings.tokens_file is None else Path(settings.tokens_file)
        self._interval_s = settings.reload_interval_s
        self._clock = clock
        self._on_reload = on_reload
        self._signature: tuple[int, int, int] | None = None
        self._credentials = self._load()
        if not len(self._credentials):
            raise TokenFileError(
                "no API token: set auth.tokens_file (k3s: a mounted Secret) or "
                "TIPGRAPH_API_TOKEN; /v1 is never open"
            )
        self._checked_at = clock()

    def current(self) -> Credentials:
        if self._path is not None and self._clock() - self._checked_at >= self._interval_s:
            self._checked_at = self._clock()
            self._reload_if_changed()
        return self._credentials

    def _reload_if_changed(self) -> None:
        try:
            if self._path is None or _signature(self._path) == self._signature:
                return
            loaded = self._load()
            if not len(loaded):
                # An empty file (one rewritten in place, caught half-way) would lock
                # every client out: the same as a broken one.
                raise TokenFileError(f"auth.tokens_file {self._path} lists no token")
            self._credentials = loaded
        except (OSError, TokenFileError) as err:
            # Keep what is in force: a half-written or broken file must not lock every
            # client out (or let anyone in).  The error is retried at the next check.
            logger.error("token file not reloaded, the loaded tokens stay valid: %s", err)
            self._report("failed")
            return
        logger.info("token file reloaded: token ids %s", ", ".join(self._credentials.ids))
        self._report("reloaded")

    def _load(self) -> Credentials:
        path = self._path
        if path is None:
            return Credentials(self._env)
        try:
            signature = _signature(path)
            text = path.read_text()
        except OSError as err:
            raise TokenFileError(f"auth.tokens_file {path}: {err.strerror}") from err
        credentials = Credentials(
            [*self._env, *parse_token_file(text, where=f"auth.tokens_file {path}")]
        )
        self._signature = signature
        return credentials

    def _report(self, outcome: str) -> None:
        if self._on_reload is not None:
            self._on_reload(outcome)


def new_token() -> str:
    """A fresh random token: 32 bytes, URL-safe (``tipgraph token new``)."""
    return "tg_" + secrets.token_urlsafe(32)


def parse_scopes(text: str) -> tuple[Scope, ...]:
    """Comma-separated scopes, checked: ``"tips,feedback"`` -> ``("tips", "feedback")``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCOPES]
    if unknown or not names:
        raise ValueError(
            f"scopes: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
            f"choose from {', '.join(SCOPES)}"
        )
    return tuple(scope for scope in SCOPES if scope in names)


def token_entry_yaml(token_id: str, token: str, scopes: Sequence[Scope]) -> str:
    """The token file entry for ``token`` (its hash, never the token)."""
    if not re.fullmatch(TOKEN_ID_PATTERN, token_id):
        raise ValueError(f"token id {token_id!r}: use 1-64 of A-Z a-z 0-9 _ . -")
    entry = {"id": token_id, "sha256": hash_token(token), "scopes": list(scopes)}
    return yaml.safe_dump([entry], sort_keys=False, default_flow_style=None)
