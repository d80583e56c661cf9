"""``POST /predict`` and ``POST /models/{name}/predict``: Ferry's own protocol."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api.deps import cache_control, json_object, service_of
from service.api.middleware import Endpoint
from service.errors import InvalidInput
from service.inference import Prediction
from service.schemas.predict import ErrorResponse, PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])

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


@router.post("/predict", summary="Predict with the named (or the only) model", **_DOC)
async def predict(request: Request) -> Response:
    body = await json_object(request)
    return await _predict(request, _field(body, "model"), body)


@router.post("/models/{name}/predict", summary="Predict with the model in the path", **_DOC)
async def predict_model(request: Request, name: str) -> Response:
    body = await json_object(request)
    named = _field(body, "model")
    if named is not None and named != name:
        raise InvalidInput(f"body names model {named!r} but the path names {name!r}", field="model")
    return await _predict(request, name, body)


FAST_ROUTES: list[tuple[str, str, Endpoint]] = [
    ("POST", "/predict", predict),
    ("POST", "/models/{name}/predict", predict_model),
]
"""Served by ``FastPath`` without FastAPI's per-route machinery."""


async def _predict(request: Request, name: str | None, body: dict[str, Any]) -> Response:
    if "inputs" not in body:
        raise InvalidInput(
            "field 'inputs' is required: rows as a nested list, or {input_name: rows}", field="inputs"
        )
    params = body.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput("field 'params' must be an object", field="params")
    result = await service_of(request).predict(
        name, body["inputs"], params=params, cache_control=cache_control(request)
    )
    return render(result)


def render(result: Prediction) -> Response:
    outputs = result.outputs
    value: Any = next(iter(outputs.values())) if len(outputs) == 1 else outputs
    content = orjson.dumps(
        {"model": result.model, "version": result.version, "outputs": value},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    return Response(
        content,
        media_type="application/json",
        headers={"X-Model-Version": result.version, "X-Cache": result.cache},
    )


def _field(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"field {key!r} must be a string, got {type(value).__name__}", field=key)
    return value
