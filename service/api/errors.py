"""Error responses, in the body of the protocol that owns the request's path (``api/protocols/``: each
protocol module's ``error_body``):

- Ferry's own: ``{"error": {"code", "message", "details"}}``;
- Open Inference Protocol (``/v2/...``): ``{"error": "message"}``; input that does not match the model is
  400 there (the protocol's convention, as KServe and Triton answer), not Ferry's 422;
- MLflow scoring (``/invocations``, ``/models/{name}/invocations``, ``/ping``, ``/health``, ``/version``):
  ``{"error_code": "BAD_REQUEST", "message": ...}`` with MLflow's codes, bad input 400 as MLflow answers.

Every FerryError, framework validation error and unknown route goes through it; 5xx bodies stay generic,
the details go to the log."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.api.protocols import protocol_of
from service.errors import ClientGone, FerryError, InvalidInput

log = logging.getLogger(__name__)


def error_response(
    status: int, code: str, message: str, details: dict[str, Any] | None = None, path: str = ""
) -> Response:
    """The error body of the protocol that ``path`` belongs to (Ferry's own when no path is given)."""
    status, body = protocol_of(path).error_body(status, code, message, details or {})
    return Response(orjson.dumps(body, default=str), status_code=status, media_type="application/json")


async def ferry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FerryError)
    if (
        exc.status >= 500
        and exc.status != HTTPStatus.SERVICE_UNAVAILABLE
        and exc.status != HTTPStatus.GATEWAY_TIMEOUT
    ):
        log.error("%s %s failed: %s", request.method, request.url.path, exc.message, exc_info=exc)
    response = error_response(exc.status, exc.code, exc.message, exc.details, request.url.path)
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    if exc.status == HTTPStatus.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg", "")}
        for e in exc.errors()
    ]
    message = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or "invalid request"
    return error_response(
        InvalidInput.status, InvalidInput.code, message, {"problems": problems}, request.url.path
    )


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = error_response(exc.status_code, code, str(exc.detail), path=request.url.path)
    for key, value in (exc.headers or {}).items():
        response.headers[key] = value
    return response


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        500,
        "internal_error",
        "internal server error; the details are in the server log",
        path=request.url.path,
    )


async def client_gone(request: Request, exc: Exception) -> Response:
    """A client that hung up while its body was read: 499, never a 500 (nobody reads the answer)."""
    return await ferry_error(request, ClientGone("the client hung up before sending its whole body"))


def install(app: FastAPI) -> None:
    app.add_exception_handler(FerryError, ferry_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
