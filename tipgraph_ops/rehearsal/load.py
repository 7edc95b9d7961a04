"""Closed-loop HTTP load: ``concurrency`` clients each post ``/v1/tips`` and wait for the
answer before the next, from a thread of their own, until stopped."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

TASKS = (
    "Finish the quarterly report for the board",
    "Pay the electricity bill",
    "Book the dentist",
    "Reply to the landlord",
    "Prepare the team offsite agenda",
    "Water the plants",
)


@dataclass(frozen=True)
class Outcome:
    """One request: when it started (seconds on the rehearsal's clock) and how it ended."""

    started: float
    latency_s: float
    status: int
    """HTTP status, or 0 when no answer came (connection refused, timeout)."""
    event_id: str | None = None
    policy_version: str | None = None
    error: str = ""
    stage_ms: dict[str, float] | None = None
    """The server's own ``latency_ms`` per stage, for an answered request."""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.event_id is not None


def tip_request(user: int, rng: random.Random) -> dict[str, object]:
    count = rng.randint(2, len(TASKS))
    return {
        "user_id": f"rehearsal-user-{user}",
        "tasks": [
            {"id": f"t{i}", "content": content, "priority": rng.randint(1, 4)}
            for i, content in enumerate(rng.sample(TASKS, count))
        ],
    }


class Load:
    """``with Load(...) as load: ...``; ``load.outcomes`` grows while it runs."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        concurrency: int,
        now: Callable[[], float] = time.monotonic,
        users: int = 500,
        timeout_s: float = 10.0,
        seed: int = 0,
    ) -> None:
        self.url = url
        self.token = token
        self.concurrency = concurrency
        self._now = now
        """Seconds on the rehearsal's clock (what ``Outcome.started`` is in)."""
        self.users = users
        self.timeout_s = timeout_s
        self._rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rehearsal-load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        asyncio.run(self._clients())

    async def _clients(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency)
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(
            base_url=self.url, headers=headers, limits=limits, timeout=self.timeout_s
        ) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.concurrency)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self._stop.is_set():
            body = tip_request(self._rng.randrange(self.users), self._rng)
            started = self._now()
            try:
                response = await client.post("/v1/tips", json=body)
            except httpx.HTTPError as err:
                self.outcomes.append(
                    Outcome(started, self._now() - started, 0, error=type(err).__name__)
                )
                await asyncio.sleep(0.05)  # a refused connection returns at once
                continue
            latency_s = self._now() - started
            if response.status_code == 200:
                answer = response.json()
                outcome = Outcome(
                    started,
                    latency_s,
                    200,
                    event_id=answer.get("event_id"),
                    policy_version=(answer.get("policy") or {}).get("version"),
                    stage_ms=answer.get("latency_ms"),
                )
            else:
                outcome = Outcome(
                    started, latency_s, response.status_code, error=response.text[:200]
                )
            self.outcomes.append(outcome)
