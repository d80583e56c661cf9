"""``/health/live`` (the process answers), ``/health/ready`` (every model loaded and warmed up) and
``/metrics``: the operations routes, served on the main port or, with ``FERRY_METRICS_PORT``, on their
own."""

from __future__ import annotations

import os

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.schemas.predict import ModelState

router = APIRouter(tags=["health"])
PATHS = ("/health/live", "/health/ready", "/metrics")
"""Probes and the scrape: left out of the HTTP metrics."""


WORKER_HEADER = "X-Ferry-Worker"
"""With ``FERRY_WORKERS`` > 1, the probes name the pid of the worker that answered."""


def _worker(request: Request, response: Response) -> None:
    if request.app.state.settings.workers != 1:
        response.headers[WORKER_HEADER] = str(os.getpid())


@router.get("/health/live", summary="Liveness: the process answers")
async def live(request: Request, response: Response) -> dict[str, str]:
    _worker(request, response)
    return {"status": "live"}


@router.get(
    "/health/ready",
    summary="Readiness: every configured model is loaded and warmed up",
    response_model=ModelState,
    responses={503: {"model": ModelState}},
)
async def ready(request: Request) -> Response:
    pipeline = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        body, ok = {"status": "starting", "models": {}}, False
    else:
        models = pipeline.models
        ok = models.ready()
        status = "ready" if ok else ("shutting_down" if models.shutting_down else "not_ready")
        body = {"status": status, "models": {s.name: s.state for s in models.slots()}}
    answer = Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")
    _worker(request, answer)
    return answer


@router.get("/metrics", include_in_schema=False)
async def scrape(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
