"""Which logged decisions a read covers: the one filter of ``tipgraph export``, ``report``
and ``tune``, passed whole from the command line down to the store's queries."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class LogFilter:
    """``since`` is inclusive and ``until`` exclusive (None: unbounded); ``prompt_version``
    is the decision's prompt template version, ``policy_name`` the served policy's name."""

    since: datetime | None = None
    until: datetime | None = None
    prompt_version: str | None = None
    policy_name: str | None = None

    def describe(self) -> dict[str, str | None]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "prompt_version": self.prompt_version,
            "policy_name": self.policy_name,
        }


EVERYTHING = LogFilter()
"""No filter: the whole log."""
