"""``POST /webhooks/mlflow``: MLflow registry webhooks (push reloads, ``service/webhooks.py``), mounted
only when ``FERRY_RELOAD__WEBHOOK_SECRET`` (or ``_FILE``) is set; the HMAC signature is its
authentication (no API key: MLflow cannot send one).

Answers: 200 with ``{"outcome": "accepted", "models": [...]}`` (the check runs after the answer) or
``{"outcome": "ignored", ...}``; 401 for a missing or wrong signature or a stale timestamp, 409 for a
delivery id accepted before, 400 naming the field of a bad payload, 503 while starting. MLflow retries
429 and 5xx answers only (3 times, backing off from 1 s), so none of the refusals is sent again."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.api.errors import error_response
from service.errors import NotReady
from service.webhooks import WebhookError, WebhookReceiver

PATH = "/webhooks/mlflow"
router = APIRouter(tags=["webhooks"])


@router.post(
    PATH,
    summary="MLflow registry webhook: re-check the model whose alias moved, now",
    responses={
        400: {"description": "the payload is not an MLflow delivery (the field is named)"},
        401: {"description": "missing or wrong X-MLflow-Signature, or a stale X-MLflow-Timestamp"},
        409: {"description": "X-MLflow-Delivery-Id accepted before (a replay)"},
    },
)
async def mlflow_webhook(request: Request) -> Response:
    receiver: WebhookReceiver | None = getattr(request.app.state, "webhooks", None)
    if receiver is None:
        raise NotReady("Ferry is starting; MLflow retries this delivery")
    body = await request.body()
    try:
        answer: dict[str, Any] = receiver.receive(request.headers, body)
    except WebhookError as exc:  # Ferry's error body, without the bearer challenge of other 401s
        return error_response(exc.status, exc.code, exc.message, exc.details, request.url.path)
    return JSONResponse(answer)
