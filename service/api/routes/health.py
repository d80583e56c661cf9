"""``/health/live`` (the process answers) and ``/health/ready`` (every model loaded and warmed up)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.schemas.predict import ModelState

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="Liveness: the process answers")
async def live() -> dict[str, str]:
    return {"status": "live"}


@router.get(
    "/health/ready",
    summary="Readiness: every configured model is loaded and warmed up",
    response_model=ModelState,
    responses={503: {"model": ModelState}},
)
async def ready(request: Request) -> Response:
    service = getattr(request.app.state, "service", None)
    if service is None:
        body, ok = {"status": "starting", "models": {}}, False
    else:
        ok = service.ready()
        status = "ready" if ok else ("shutting_down" if service.shutting_down else "not_ready")
        body = {"status": status, "models": {s.name: s.state for s in service.slots()}}
    return Response(orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json")
