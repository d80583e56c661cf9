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
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import PlainTextResponse, Response

from service.api.deps import cache_control, read_body, request_key
from service.api.frames import csv_inputs, json_payload, payload_inputs
from service.api.protocols.base import Codec, Protocol, Route, json_default, owns_routes
from service.batcher import Probe
from service.columns import decode_inputs
from service.errors import InvalidInput, NotReady, UnsupportedMediaType
from service.pipeline import Answer, Call, Decoded
from service.registry import LoadedModel
from service.schemas import mlflow as schema
from service.schemas.v2 import inline_schema


async def decode(request: Request, path: Mapping[str, str], gone: Probe | None) -> Call:
    """The raw body and its content type; the pipeline has them decoded against the answering version."""
    content_type = request.headers.get("content-type")
    body = await read_body(request)

    def inputs_of(model: LoadedModel) -> Decoded:
        media, _, options = (content_type or "application/json").partition(";")
        media = media.strip().lower()
        charset = (
            options.strip().lower().removeprefix("charset=").strip('"') if "charset" in options else "utf-8"
        )
        if media not in ("application/json", "text/csv") or charset != "utf-8":
            raise UnsupportedMediaType(
                f"content type {content_type!r} is not supported: send application/json or text/csv, in UTF-8"
            )
        specs = model.inputs
        params: Any = None
        if media == "text/csv":
            value = csv_inputs(specs, body)
        else:
            payload = json_payload(body)
            params = payload.get("params")
            if params is not None and not isinstance(params, dict):
                raise InvalidInput("field 'params' must be an object", field="params")
            value = payload_inputs(specs, payload)
        arrays, rows = decode_inputs(specs, value, unknown="ignore")  # as MLflow ignores them
        return Decoded(arrays, rows, params)

    return Call(
        path.get("name"),
        "mlflow",
        inputs_of,
        cache=cache_control(request),
        gone=gone,
        key=request_key(request),
    )


def encode(answer: Answer) -> Response:
    content = orjson.dumps(
        {"predictions": predictions(answer)}, default=json_default, option=orjson.OPT_SERIALIZE_NUMPY
    )
    return Response(
        content,
        media_type="application/json",
        headers={"X-Model-Version": answer.version, "X-Cache": answer.cache},
    )


async def ping(request: Request) -> Response:
    pipeline = getattr(request.app.state, "pipeline", None)
    if pipeline is None or not pipeline.models.ready():
        states = {s.name: str(s.state) for s in pipeline.models.slots()} if pipeline is not None else {}
        raise NotReady(f"not ready: {states}" if states else "the service is starting")
    return PlainTextResponse("\n")  # MLflow answers a bare newline; clients read the status only


async def version() -> Response:
    return Response(_mlflow_version(), media_type="text/plain")


@functools.cache
def _mlflow_version() -> str:
    return importlib.metadata.version("mlflow")


def predictions(answer: Answer) -> Any:
    """The ``predictions`` MLflow's scoring server writes for what the model returned: a DataFrame as
    records, a Series as records of its one column, a dict as it is, an array (or list) as its rows;
    ``{output_name: rows}`` for ONNX models (MLflow's ONNX flavor returns a dict) and several outputs."""
    outputs, form = answer.outputs, answer.form
    if form.kind == "frame":
        names = list(outputs)
        return [
            dict(zip(names, row, strict=True))
            for row in zip(*(_cells(a) for a in outputs.values()), strict=True)
        ]
    if form.kind == "series":
        return [{form.key: v} for v in _cells(next(iter(outputs.values())))]
    if form.kind != "dict" and answer.flavor != "onnx" and len(outputs) == 1:
        return next(iter(outputs.values()))
    return outputs


def _cells(array: np.ndarray) -> list[Any]:
    return (
        array.tolist()
        if array.dtype.kind != "O"
        else [json_default(v) if isinstance(v, bytes) else v for v in array.tolist()]
    )


_MLFLOW_CODES = {
    "invalid_input": "INVALID_PARAMETER_VALUE",
    "invalid_value": "BAD_REQUEST",  # MLflow: "Failed to convert column ... to type ..."
    "model_rejected": "BAD_REQUEST",  # MLflow: "Encountered an unexpected error while evaluating ..."
    "model_not_found": "RESOURCE_DOES_NOT_EXIST",
    "not_found": "ENDPOINT_NOT_FOUND",
    "payload_too_large": "REQUEST_LIMIT_EXCEEDED",
}
"""Ferry's code to MLflow's ``error_code`` (``mlflow.protos.databricks_pb2.ErrorCode`` names)..."""
_MLFLOW_BY_STATUS = {
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "ENDPOINT_NOT_FOUND",
    429: "REQUEST_LIMIT_EXCEEDED",
    503: "TEMPORARILY_UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
"""...or, for the others, by HTTP status (then BAD_REQUEST for a 4xx, INTERNAL_ERROR for a 5xx)."""


def error_body(
    status: int, code: str, message: str, details: Mapping[str, Any]
) -> tuple[int, dict[str, Any]]:
    """MLflow's ``{"error_code", "message"}``; bad input is 400, as MLflow answers."""
    if status == HTTPStatus.UNPROCESSABLE_ENTITY:
        status = HTTPStatus.BAD_REQUEST
    fallback = _MLFLOW_BY_STATUS.get(status, "INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
    return status, {"error_code": _MLFLOW_CODES.get(code, fallback), "message": message}


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
_TEXT = {"response_class": PlainTextResponse}
CODEC = Codec(decode, encode)
ROUTES = (
    Route("POST", "/invocations", CODEC,
          {"summary": "Score with the default model (MLflow protocol)", **_DOC}),
    Route("POST", "/models/{name}/invocations", CODEC,
          {"summary": "Score with the named model (MLflow protocol)", **_DOC}),
    Route("GET", "/health", ping, {"summary": "Same as /ping (MLflow protocol)", **_TEXT}, metered=False),
    Route("GET", "/ping", ping, {"summary": "200 when every model is ready (MLflow protocol)", **_TEXT},
          metered=False),
    Route("GET", "/version", version, {"summary": "The MLflow version (MLflow protocol)"}),
)  # fmt: skip
_ROUTED = owns_routes(ROUTES)
PROTOCOL = Protocol(
    "mlflow",
    "mlflow scoring protocol",
    ROUTES,
    error_body,
    owns=lambda path: _ROUTED(path) or (path.startswith("/models/") and path.endswith("/invocations")),
)
