"""MLflow's scoring protocol, as ``mlflow models serve`` speaks it: ``/invocations``, ``/ping``, ``/health``,
``/version``.

``POST /invocations`` serves the default model, ``POST /models/{name}/invocations`` any served model.
The body is JSON with exactly one of ``dataframe_split``, ``dataframe_records``, ``instances`` or
``inputs`` (and optional ``params``), or ``text/csv``; ``service.api.frames`` maps them to the model's
tensor inputs. Answers are ``{"predictions": ...}`` in the shape MLflow gives:
``{output_name: rows}`` for ONNX models (MLflow's ONNX flavor returns a dict) and for models with
several outputs, else the rows. Errors are ``{"error_code": ..., "message": ...}``; bad input is 400.
"""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from service.api.deps import cache_control, service_of
from service.api.frames import csv_inputs, json_payload, payload_inputs
from service.api.middleware import Endpoint
from service.errors import InvalidInput, NotReady, UnsupportedMediaType
from service.inference import InferenceService, Prediction
from service.schemas import mlflow as schema
from service.schemas.v2 import inline_schema
from service.signature import decode_inputs

router = APIRouter(tags=["mlflow scoring protocol"])


_DOC: dict[str, Any] = {
    "response_model": schema.InvocationsResponse,
    "responses": {code: {"model": schema.ErrorResponse} for code in (400, 404, 413, 415, 503, 504)},
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": inline_schema(schema.InvocationsRequest)},
                "text/csv": {"schema": {"type": "string"}},
            },
        }
    },
}


@router.post("/invocations", summary="Score with the default model (MLflow protocol)", **_DOC)
async def invocations(request: Request) -> Response:
    return await _invoke(request, None)


@router.post("/models/{name}/invocations", summary="Score with the named model (MLflow protocol)", **_DOC)
async def model_invocations(request: Request, name: str) -> Response:
    return await _invoke(request, name)


FAST_ROUTES: list[tuple[str, str, Endpoint]] = [
    ("POST", "/invocations", invocations),
    ("POST", "/models/{name}/invocations", model_invocations),
]
"""Served by ``FastPath`` without FastAPI's per-route machinery."""


@router.get(
    "/ping", summary="200 when every model is ready (MLflow protocol)", response_class=PlainTextResponse
)
@router.get("/health", summary="Same as /ping (MLflow protocol)", response_class=PlainTextResponse)
async def ping(request: Request) -> Response:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready():
        states = {s.name: s.state for s in service.slots()} if service is not None else {}
        raise NotReady(f"not ready: {states}" if states else "the service is starting")
    return PlainTextResponse("\n")  # MLflow answers a bare newline; clients read the status only


@router.get("/version", summary="The MLflow version (MLflow protocol)")
async def version() -> Response:
    return Response(_mlflow_version(), media_type="text/plain")


@functools.cache
def _mlflow_version() -> str:
    return importlib.metadata.version("mlflow")


async def _invoke(request: Request, name: str | None) -> Response:
    service = service_of(request)
    active = service.active(name)
    media, _, options = request.headers.get("content-type", "application/json").partition(";")
    media = media.strip().lower()
    charset = options.strip().lower().removeprefix("charset=").strip('"') if "charset" in options else "utf-8"
    if media not in ("application/json", "text/csv") or charset != "utf-8":
        raise UnsupportedMediaType(
            f"content type {request.headers.get('content-type')!r} is not supported: send application/json "
            "or text/csv, in UTF-8"
        )
    body = await request.body()
    specs = active.model.inputs
    params: Any = None
    try:
        if media == "text/csv":
            value = csv_inputs(specs, body)
        else:
            payload = json_payload(body)
            params = payload.get("params")
            if params is not None and not isinstance(params, dict):
                raise InvalidInput("field 'params' must be an object", field="params")
            value = payload_inputs(specs, payload)
        arrays, rows = decode_inputs(specs, value)
    except InvalidInput:
        active.metrics.invalid.inc()
        raise
    result = await service.compute(
        active, arrays, rows, protocol="mlflow", params=params, cache_control=cache_control(request)
    )
    return _render(result, active.model.flavor)


def _render(result: Prediction, flavor: str) -> Response:
    outputs = result.outputs
    predictions: Any = outputs if flavor == "onnx" or len(outputs) != 1 else next(iter(outputs.values()))
    content = orjson.dumps({"predictions": predictions}, default=_tolist, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(
        content,
        media_type="application/json",
        headers={"X-Model-Version": result.version, "X-Cache": result.cache},
    )


def _tolist(value: Any) -> Any:
    """What orjson does not write natively: arrays of strings or objects, and the bytes in them."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
