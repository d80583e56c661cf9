"""Ferry's own protocol: ``POST /predict``, ``POST /models/{name}/predict``, ``GET /models``,
``GET /models/{name}``. Errors are ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from service.api.deps import Models, cache_control, json_object, request_key
from service.api.protocols.base import Codec, Protocol, Route, json_default
from service.batcher import Probe
from service.columns import decode_inputs
from service.config import BatchSettings
from service.errors import InvalidInput
from service.lifecycle import ModelSlot
from service.pipeline import Answer, Call, Decoded
from service.registry import LoadedModel
from service.schemas.predict import ErrorResponse, PredictRequest, PredictResponse


async def decode(request: Request, path: Mapping[str, str], gone: Probe | None) -> Call:
    """The body's model (or the path's), inputs and params; the inputs are decoded against the
    answering version's signature in the pipeline."""
    body = await json_object(request)
    name = _field(body, "model")
    in_path = path.get("name")
    if in_path is not None:
        if name is not None and name != in_path:
            raise InvalidInput(f"body names model {name!r} but the path names {in_path!r}", field="model")
        name = in_path
    if "inputs" not in body:
        raise InvalidInput(
            "field 'inputs' is required: rows as a nested list, or {input_name: rows}", field="inputs"
        )
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput("field 'params' must be an object", field="params")
    inputs = body["inputs"]

    def inputs_of(model: LoadedModel) -> Decoded:
        arrays, rows = decode_inputs(model.inputs, inputs)
        return Decoded(arrays, rows, params)

    return Call(name, "ferry", inputs_of, cache=cache_control(request), gone=gone, key=request_key(request))


def encode(answer: Answer) -> Response:
    outputs = answer.outputs
    value: Any = next(iter(outputs.values())) if len(outputs) == 1 else outputs
    content = orjson.dumps(
        {"model": answer.model, "version": answer.version, "outputs": value},
        default=json_default,
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    response = Response(content, media_type="application/json")
    # The same headers, in the same order, as ``headers={"X-Model-Version": ..., "X-Cache": ...}`` gives,
    # without starlette lower-casing and encoding a dict of them on every answer.
    response.raw_headers[:0] = [
        (b"x-model-version", answer.version.encode("latin-1")),
        (b"x-cache", answer.cache.encode("latin-1")),
    ]
    return response


def error_body(
    status: int, code: str, message: str, details: Mapping[str, Any]
) -> tuple[int, dict[str, Any]]:
    return status, {"error": {"code": code, "message": message, "details": details or {}}}


def describe(slot: ModelSlot, batch: BatchSettings) -> dict[str, Any]:
    """A model's JSON description: ``GET /models``, ``GET /models/{name}`` and the admin API."""
    out: dict[str, Any] = {"name": slot.name, "uri": slot.spec.uri, "state": slot.state}
    if slot.error:
        out["error"] = slot.error
    if slot.active is not None:
        model = slot.active.model
        info = model.runtime.info
        out |= {
            "alias": model.ref.alias,
            "version": model.ref.version,
            "flavor": model.flavor,
            "runtime": info.runtime,
            "device": info.device,
            "providers": list(info.providers),
            "signature": {
                "inputs": [s.describe() for s in model.inputs],
                "outputs": [s.describe() for s in model.outputs],
            },
        }
    out["batching"] = {
        "enabled": batch.enabled,
        "max_rows": batch.max_rows,
        "max_wait_ms": batch.max_wait_ms,
        "queue_rows": batch.queue_rows,
        "timeout_ms": batch.timeout_ms,
    }
    return out


async def list_models(request: Request, models: Models) -> dict[str, Any]:
    batch = request.app.state.settings.batch
    return {"models": [describe(slot, batch) for slot in models.slots()], "default": models.default_model}


async def get_model(request: Request, name: str, models: Models) -> dict[str, Any]:
    return describe(models.find(name), request.app.state.settings.batch)


def _field(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"field {key!r} must be a string, got {type(value).__name__}", field=key)
    return value


_DOC: dict[str, Any] = {
    "response_model": PredictResponse,
    "responses": {code: {"model": ErrorResponse} for code in (400, 404, 413, 422, 503, 504)},
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
        }
    },
}
CODEC = Codec(decode, encode)
ROUTES = (
    Route("POST", "/predict", CODEC, {"summary": "Predict with the named (or the only) model", **_DOC}),
    Route("POST", "/models/{name}/predict", CODEC, {"summary": "Predict with the model in the path", **_DOC}),
    Route("GET", "/models", list_models, {"summary": "Served models", "tags": ["models"]}),
    Route("GET", "/models/{name}", get_model, {"summary": "One served model", "tags": ["models"]}),
)
PROTOCOL = Protocol("ferry", "predict", ROUTES, error_body, owns=lambda path: False)
"""Ferry's own protocol claims no path: it is the default of every path no other protocol owns."""
