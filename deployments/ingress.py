"""HTTP ingress: the FastAPI app the recommender calls. Orchestration lives in TipService."""

import asyncio
import logging
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.bus import LearningHandles
from tipgraph.auth import Credential, CredentialSource, required_scope
from tipgraph.batching import Coalescer
from tipgraph.contracts import (
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    Identifier,
    TipRequest,
    TipResponse,
    UserErasure,
)
from tipgraph.decision_log import decision_log_problem
from tipgraph.errors import InvalidRequest, TipgraphError, describe_error
from tipgraph.features import UserContext
from tipgraph.generation import GenerationItem, GenerationResult
from tipgraph.guardrails import evaluate_guardrails
from tipgraph.logs import ReplicaLogs
from tipgraph.metrics import replica_metrics
from tipgraph.periodic import Periodic
from tipgraph.retention import RetentionJob
from tipgraph.scoring import PolicyScore, ShadowItem
from tipgraph.settings import HopSettings, HopsSettings, TipgraphSettings
from tipgraph.shadows import MAX_SHADOW_INFLIGHT, ShadowErrors, ShadowShed, per_shadow
from tipgraph.wiring import tip_service

logger = logging.getLogger(__name__)

api = FastAPI(
    title="tipgraph",
    version="0.1.0",
    description="One helpful tip per request, chosen by a contextual bandit that learns "
    "from feedback.",
)
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (401, 403, 404, 409, 413, 422, 503)
}
PROTECTED_PREFIX = "/v1/"
REPLICA_GONE = (RayActorError, ActorUnavailableError)
"""A call failed because its replica died or is unreachable (a lost node, a replica
stopped in an update): not the request's fault, and safe to send again."""
STAGE_RETRIES = 2
BUS_STATS_TIMEOUT_S = 2.0
RETENTION_FIRST_AFTER_S = 60.0
"""A new replica's first retention run: soon, not at once (a start is busy enough)."""


def _field(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


# Built once: a path's user id is checked on every erasure request.
USER_ID = TypeAdapter(Identifier)


def _checked_user_id(user_id: str) -> str:
    """The path's user id under the same rules as a request body's ``user_id``."""
    try:
        return USER_ID.validate_python(user_id)
    except ValidationError as err:
        raise InvalidRequest(f"user_id: {err.errors()[0]['msg']}") from err


def _unauthorized(status: int, detail: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(status_code=status, content={"detail": detail}, headers=headers)


class BearerAuth:
    """Everything under /v1 needs a bearer token with the route's scope
    (:func:`tipgraph.auth.required_scope`); health checks and the docs stay open.

    401 without a valid token (none, unknown, removed or past ``not_after``), 403 for a
    valid token without the scope.  Every /v1 request is counted by token id, route and
    status (``tipgraph_http_requests``) and, with ``logs.access_log``, logged with its
    token id: never the token.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware
    spends a task and a body stream per request, 11% of the ingress's CPU in the profile
    (BENCHMARKS.md).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _api_path(scope) if scope["type"] == "http" else None
        if path is None:
            return await self.app(scope, receive, send)
        # scope["app"], not the module's `api`: Serve ships the app to the replica by value,
        # so the module global there is another object than the one serving (and configured).
        state = scope["app"].state
        needed = required_scope(scope["method"], path)
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, presented = header.partition(" ")
        credential = None
        if scheme.lower() != "bearer" or not presented.strip():
            response = _unauthorized(
                401, "missing bearer token: send 'Authorization: Bearer <token>'"
            )
        elif (credential := state.credentials.current().authenticate(presented.strip())) is None:
            response = _unauthorized(401, "the bearer token is not valid (unknown or expired)")
        elif not credential.allows(needed):
            response = _unauthorized(
                403, f"token {credential.id!r} does not have the {needed!r} scope"
            )
        else:
            return await self.app(scope, receive, _Recorded(send, state, credential.id, needed))
        await response(scope, receive, _Recorded(send, state, _token_id(credential), needed))


def _token_id(credential: Credential | None) -> str:
    return "none" if credential is None else credential.id


class _Recorded:
    """``send`` that counts and logs the response's status once it starts."""

    __slots__ = ("_route", "_send", "_state", "_token_id")

    def __init__(self, send: Send, state: Any, token_id: str, route: str) -> None:
        self._send = send
        self._state = state
        self._token_id = token_id
        self._route = route

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            status = int(message["status"])
            self._state.metrics.http_request(self._token_id, self._route, status)
            if self._state.access_log:
                logger.info(
                    "%s %d token_id=%s",
                    self._route,
                    status,
                    self._token_id,
                    extra={"token_id": self._token_id},
                )
        await self._send(message)


class BodyTooLarge(Exception):
    """Raised into the app from ``receive`` when the body passes the limit."""


class BodySizeLimit:
    """Refuse oversized bodies before parsing them: a 10 MB task list is a client bug.

    A declared ``Content-Length`` over the limit is refused before anything is read.  A body
    without one (chunked) is counted as it arrives: the read that crosses the limit raises
    into the app, and whatever answer the app makes of that (FastAPI turns a failed body
    read into a 400) is replaced by the 413, so the body is never read whole.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit: int = getattr(scope["app"].state, "max_body_bytes", 1_000_000)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(f"request body is {declared} bytes", limit)(
                scope, receive, send
            )
        received = 0
        refused = False

        async def refuse() -> None:  # built only when needed: not on every request
            await _too_large(f"request body passed {limit} bytes", limit)(scope, receive, send)

        async def counted() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise BodyTooLarge
            return message

        async def answer(message: Message) -> None:
            if not refused:
                await send(message)
            elif message["type"] == "http.response.start":
                await refuse()

        try:
            await self.app(scope, counted, answer)
        except BodyTooLarge:
            await refuse()


def _too_large(what: str, limit: int) -> JSONResponse:
    return JSONResponse(status_code=413, content={"detail": f"{what}; the limit is {limit}"})


def _api_path(scope: Scope) -> str | None:
    """The path below the route prefix when it is under /v1 (needs a token), else None."""
    root: str = scope.get("root_path", "")
    path: str = scope["path"]
    if root and path.startswith(root):
        path = path[len(root) :]
    return path if path.startswith(PROTECTED_PREFIX) else None


# The last added runs first: the size check, then the token.
api.add_middleware(BearerAuth)
api.add_middleware(BodySizeLimit)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"field": _field(tuple(err.get("loc", ()))), "message": str(err.get("msg", ""))}
        for err in exc.errors()
    ]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return JSONResponse(status_code=422, content={"detail": detail, "errors": errors})


@api.exception_handler(TipgraphError)
async def _tipgraph_error(_: Request, exc: TipgraphError) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.message})


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error")
    return JSONResponse(
        status_code=503, content={"detail": "tipgraph could not serve this request; retry"}
    )


class HandleStages:
    """:class:`tipgraph.stages.Stages` backed by Serve deployment handles.

    Calls to context, generation, scoring and the shadows go out in batches
    (:mod:`tipgraph.batching`): one remote call per batch, not per request.
    """

    def __init__(
        self,
        context: DeploymentHandle,
        generation: DeploymentHandle,
        scoring: DeploymentHandle,
        shadows: DeploymentHandle | None,
        shadow_names: list[str],
        hops: HopsSettings,
        generation_hop: HopSettings,
    ) -> None:
        def batched(
            send: Any, hop: HopSettings, retries: int = STAGE_RETRIES
        ) -> Coalescer[Any, Any]:
            return Coalescer(
                send,
                max_batch_size=hop.max_batch_size,
                max_inflight=hop.max_inflight_batches,
                linger_s=hop.linger_s,
                retry_on=REPLICA_GONE,
                retries=retries,
            )

        self._learning = LearningHandles(scoring, shadows if shadow_names else None, hops.scoring)
        self._shadow_names = shadow_names
        self._context: Coalescer[tuple[TipRequest, str], UserContext] = batched(
            context.build_batch.remote, hops.context
        )
        self._generation: Coalescer[GenerationItem, GenerationResult] = batched(
            generation.generate_batch.remote, generation_hop
        )
        self._score: Coalescer[tuple[np.ndarray, str], PolicyScore] = batched(
            scoring.score_batch.remote, hops.scoring
        )
        self._shadow_score: Coalescer[ShadowItem, ShadowErrors] | None = (
            batched(shadows.shadow_batch.remote, hops.shadows, retries=0)
            if shadows is not None and shadow_names
            else None
        )

    def batch_sizes(self) -> dict[str, float]:
        """Mean requests per remote call, per hop (shown by /readyz)."""
        hops: dict[str, Coalescer[Any, Any]] = {
            "context": self._context,
            "generation": self._generation,
            "scoring": self._score,
        }
        if self._shadow_score is not None:
            hops["shadows"] = self._shadow_score
        return {name: round(hop.mean_batch_size, 2) for name, hop in hops.items()}

    async def context(self, request: TipRequest, user_key: str) -> UserContext:
        return await self._context((request, user_key))

    async def candidates(
        self, request: TipRequest, context: UserContext, user_key: str, event_id: str, n: int
    ) -> GenerationResult:
        return await self._generation((request, context, user_key, event_id, n))

    async def score(self, X: np.ndarray, event_id: str) -> PolicyScore:
        return await self._score((X, event_id))

    def shadow_scores(
        self, X: np.ndarray, event_id: str, candidate_ids: list[str], served_candidate_id: str
    ) -> list[tuple[str, Awaitable[str | None]]]:
        """Queue the event for the shadows, which score, log and count it (against the
        served pick) in their own replica; what comes back is each shadow's error, or None."""
        hop = self._shadow_score
        if hop is None:
            return []
        if hop.queued >= MAX_SHADOW_INFLIGHT:
            # Shadows that cannot keep up are skipped and counted, never queued behind.
            return [(name, _shed(hop.queued)) for name in self._shadow_names]
        answer = hop.submit((X, event_id, candidate_ids, served_candidate_id))
        return list(per_shadow(answer, self._shadow_names))

    async def drain_shadows(self) -> None:
        """Send every queued shadow event now and wait for the calls (graceful shutdown)."""
        if self._shadow_score is not None:
            await self._shadow_score.drain()

    async def learn(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> None:
        await self._learning.learn(reward_id, features, reward, rewarded_at)

    def learn_shadows(
        self, reward_id: int, features: list[float], reward: float, rewarded_at: float
    ) -> list[Awaitable[object]]:
        return self._learning.learn_shadows(reward_id, features, reward, rewarded_at)


def _shed(queued: int) -> asyncio.Future[str | None]:
    shed: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
    shed.set_exception(ShadowShed(f"{queued} events queued"))
    return shed


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        settings: TipgraphSettings,
        context: DeploymentHandle,
        generation: DeploymentHandle,
        scoring: DeploymentHandle,
        shadows: DeploymentHandle | None,
        bus: DeploymentHandle | None = None,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._logs = ReplicaLogs(settings.logs).start()
        metrics = replica_metrics(settings.metrics)
        api.state.credentials = CredentialSource(settings.auth, on_reload=metrics.token_reload)
        api.state.metrics = metrics
        api.state.access_log = settings.logs.access_log
        api.state.max_body_bytes = settings.limits.max_body_bytes
        self._stages = HandleStages(
            context,
            generation,
            scoring,
            shadows,
            [shadow.policy.name for shadow in settings.shadows],
            settings.hops,
            settings.hops.for_generation(settings.generation),
        )
        self._service = tip_service(
            settings,
            lambda *_: self._stages,
            owner="ingress",
            metrics=metrics,
        )
        self._store = self._service.store
        self._defaults = Periodic(
            settings.learning.default_reward_check_s,
            self._service.apply_default_rewards,
            name="default-rewards",
        ).start()
        self._gauges = Periodic(
            settings.metrics.sample_interval_s, self._service.sample_metrics, name="metrics"
        ).start()
        self._retention = Periodic(
            settings.retention.interval_s,
            RetentionJob(self._store, settings.retention, metrics).run,
            name="retention",
            first_after_s=min(settings.retention.interval_s, RETENTION_FIRST_AFTER_S),
        ).start()
        self._guardrails = Periodic(
            settings.experiment.guardrail_check_s,
            self._sample_guardrails,
            name="guardrails",
        )
        if settings.experiment.guardrails:
            self._guardrails.start()
        # A replica that replaces a killed one starts by replaying what that one left.
        self._replays = Periodic(
            settings.store.replay_interval_s,
            self._service.log.replay_orphans,
            name="wal-replay",
            first_after_s=0,
        ).start()

    def _sample_guardrails(self) -> None:
        now = datetime.now(UTC)
        for result in evaluate_guardrails(self._store, self._settings.experiment, now):
            self._service.metrics.guardrail(result.name, result.crossed)
            if result.crossed:
                logger.warning("guardrail %s crossed: %s", result.name, result.evidence)

    @api.post("/v1/tips", response_model=TipResponse, responses=ERRORS)
    async def tips(self, body: TipRequest) -> TipResponse:
        """One tip for the user, with its probability and the full ranking."""
        return await self._service.tip(body)

    @api.post("/v1/feedback", response_model=FeedbackResponse, responses=ERRORS)
    async def feedback(self, body: FeedbackRequest, response: Response) -> FeedbackResponse:
        """The user's reaction to a tip; every policy learns from it exactly once.

        202 with ``status: pending`` when the decision cannot be read yet (still being
        written, or the database is down): the feedback is held and applied once it can.
        """
        answer = await self._service.feedback(body)
        if answer.status == "pending":
            response.status_code = 202
        return answer

    @api.delete("/v1/users/{user_id}", response_model=UserErasure, responses=ERRORS)
    async def erase_user(self, user_id: str) -> UserErasure:
        """Erase the user's decisions and feedback; what the policies learned stays."""
        return await self._service.erase_user(_checked_user_id(user_id))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self) -> JSONResponse:
        try:
            version = await asyncio.to_thread(self._store.schema_version)
        except Exception as err:
            logger.warning("not ready: store unavailable: %s", err)
            return JSONResponse(status_code=503, content={"detail": "decision store unavailable"})
        log = self._service.log.health()
        problem = decision_log_problem(log, self._settings.store.max_unwritten_age_s)
        if problem is not None:
            logger.warning("not ready: %s", problem)
            return JSONResponse(status_code=503, content={"detail": problem})
        return JSONResponse(
            {
                "status": "ready",
                "schema_version": version,
                "decision_log_backlog": log.backlog,
                "decision_log_oldest_unwritten_s": round(log.oldest_unwritten_s, 3),
                "decision_log_dead_letters": log.dead_lettered,
                "decision_log_torn_lines": log.torn_lines,
                "decision_log_replayed": log.replayed,
                "decision_log_dropped_erased": log.dropped_erased,
                "shadows_shed": self._service.shadows_shed,
                "shadow_failures": self._service.shadow_failures,
                "decision_log_spilled": log.spilled,
                "feedback_held": self._service.held_feedback,
                "feedback_expired": self._service.feedback_expired,
                "mean_batch_size": self._stages.batch_sizes(),
                **({"bus": await self._bus_stats()} if self._bus is not None else {}),
            }
        )

    async def _bus_stats(self) -> dict[str, Any]:
        """One bus replica's counts and the consumer's lag.  The bus does not decide
        readiness: HTTP feedback works without it, and its reactions wait in the stream."""
        assert self._bus is not None
        try:
            stats: dict[str, Any] = await asyncio.wait_for(
                self._bus.stats.remote(), BUS_STATS_TIMEOUT_S
            )
        except Exception as err:
            return {"error": describe_error(err)}
        return stats

    async def __del__(self) -> None:
        # Graceful shutdown (SIGTERM, scale-down): write every buffered decision first.
        self._defaults.stop()
        self._gauges.stop()
        self._replays.stop()
        self._retention.stop()
        self._guardrails.stop()
        await self._stages.drain_shadows()
        await self._service.close()
        self._store.close()
        self._logs.close()
