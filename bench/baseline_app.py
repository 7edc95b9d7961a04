"""The single-process baseline for ``bench/bench_graph.py``: the same context, generation
and scoring code as the Serve graph, called in-process from one FastAPI/uvicorn process.

Run by the harness as ``uvicorn bench.baseline_app:app``; configured through the same
``TIPGRAPH_*`` environment as the graph (store URL, API token).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Header, HTTPException

from tipgraph.contracts import FeedbackRequest, FeedbackResponse, TipRequest, TipResponse
from tipgraph.errors import TipgraphError
from tipgraph.local import LocalStages
from tipgraph.service import TipService
from tipgraph.settings import load_settings, resolve_paths
from tipgraph.wiring import tip_service

settings = resolve_paths(load_settings(), Path.cwd())
state: dict[str, TipService] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    state["service"] = tip_service(
        settings, lambda *wired: LocalStages(settings, *wired), owner="baseline"
    )
    yield
    await state["service"].close()
    state["service"].store.close()


app = FastAPI(lifespan=lifespan)


def _check(authorization: str | None) -> None:
    token = settings.auth.api_token
    if token is None or authorization != f"Bearer {token.get_secret_value()}":
        raise HTTPException(status_code=401, detail="bearer token required")


@app.post("/v1/tips", response_model=TipResponse)
async def tips(body: TipRequest, authorization: str | None = Header(None)) -> TipResponse:
    _check(authorization)
    try:
        return await state["service"].tip(body)
    except TipgraphError as err:
        raise HTTPException(status_code=err.status_code, detail=err.message) from err


@app.post("/v1/feedback", response_model=FeedbackResponse)
async def feedback(
    body: FeedbackRequest, authorization: str | None = Header(None)
) -> FeedbackResponse:
    _check(authorization)
    return await state["service"].feedback(body)
