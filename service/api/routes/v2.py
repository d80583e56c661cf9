"""Open Inference Protocol v2 (KServe, Triton, MLServer clients) under ``/v2``, from the same models.

Health, server and model metadata, model readiness and inference, with the binary tensor data
extension. A version in the path must be the loaded one (404 naming it otherwise). Errors are the
protocol's ``{"error": "..."}``; input that does not match the model is 400, as KServe and Triton answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import __version__
from service.api import tensors
from service.api.deps import cache_control, service_of
from service.api.jsonbody import parse_object
from service.api.middleware import Endpoint
from service.errors import InvalidInput, ModelNotFound, NotReady
from service.inference import ActiveVersion, InferenceService, ModelSlot, Prediction
from service.schemas import v2 as schema
from service.signature import shared_rows

if TYPE_CHECKING:
    from service.runtime.base import TensorSpec

router = APIRouter(tags=["open inference protocol v2"])

PLATFORMS = {"onnx": "onnxruntime_onnx", "pytorch": "mlflow_pytorch", "pyfunc": "mlflow_pyfunc"}
"""The ``platform`` of a model's metadata, by MLflow flavor."""
EXTENSIONS = ["binary_tensor_data"]
_HEADER = "inference-header-content-length"
_TRANSPORT = frozenset({"binary_data_output"})
"""Request parameters about the response's encoding: not model parameters, not part of the cache key."""
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schema.ErrorResponse} for code in (400, 404, 413, 503, 504)
}
_INFER_DOC: dict[str, Any] = {
    "response_model": schema.InferenceResponse,
    "responses": _ERRORS,
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema.inline_schema(schema.InferenceRequest)}},
        }
    },
}


@router.get("/v2", summary="Server metadata", response_model=schema.ServerMetadata)
async def server_metadata() -> dict[str, Any]:
    return {"name": "ferry", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/health/live", summary="Server live", response_model=schema.ServerLive)
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="Server ready: every model loaded", response_model=schema.ServerReady)
async def server_ready(request: Request) -> Response:
    service: InferenceService | None = getattr(request.app.state, "service", None)
    ready = service is not None and service.ready()
    return _json({"ready": ready}, 200 if ready else 503)


@router.get("/v2/models/{name}", summary="Model metadata", response_model=schema.ModelMetadata)
async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return _metadata(service_of(request).find(name), None)


@router.get(
    "/v2/models/{name}/versions/{version}",
    summary="Model version metadata",
    response_model=schema.ModelMetadata,
)
async def version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return _metadata(service_of(request).find(name), version)


@router.get("/v2/models/{name}/ready", summary="Model ready", response_model=schema.ModelReady)
async def model_ready(request: Request, name: str) -> Response:
    return _ready(service_of(request).find(name), None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    summary="Model version ready",
    response_model=schema.ModelReady,
)
async def version_ready(request: Request, name: str, version: str) -> Response:
    return _ready(service_of(request).find(name), version)


@router.post("/v2/models/{name}/infer", summary="Inference", **_INFER_DOC)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", summary="Inference on a version", **_INFER_DOC)
async def infer_version(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


FAST_ROUTES: list[tuple[str, str, Endpoint]] = [
    ("POST", "/v2/models/{name}/infer", infer),
    ("POST", "/v2/models/{name}/versions/{version}/infer", infer_version),
]
"""Served by ``FastPath`` without FastAPI's per-route machinery."""


async def _infer(request: Request, name: str, version: str | None) -> Response:
    service = service_of(request)
    active = service.active(name)
    _check_version(name, version, active)
    header, binary = tensors.split_body(await request.body(), request.headers.get(_HEADER))
    body = parse_object(bytes(header), arrays=(), tensors=("inputs",))
    try:
        arrays = tensors.decode_inputs(active.model.inputs, body.get("inputs"), binary)
        rows = shared_rows(arrays)
        parameters = _parameters(body.get("parameters"), "request")
        default_binary = parameters.get("binary_data_output") is True
        selection = _selection(body.get("outputs"), active.model.outputs, default_binary)
        request_id = body.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidInput("field 'id' must be a string", field="id")
    except InvalidInput:
        active.metrics.invalid.inc()
        raise
    params = {k: v for k, v in parameters.items() if k not in _TRANSPORT} or None
    result = await service.compute(
        active, arrays, rows, protocol="v2", params=params, cache_control=cache_control(request)
    )
    return _render(result, request_id, selection, default_binary)


def _render(
    result: Prediction, request_id: str | None, selection: list[tuple[str, bool]] | None, default: bool
) -> Response:
    outputs, blobs = [], []
    for name, binary in selection if selection is not None else [(n, default) for n in result.outputs]:
        array = result.outputs.get(name)
        if array is None:
            raise InvalidInput(f"unknown output {name!r}; the model produced {sorted(result.outputs)}")
        entry: dict[str, Any] = {
            "name": name,
            "datatype": tensors.datatype_of(array.dtype),
            "shape": list(array.shape),
        }
        if binary:
            blob = tensors.encode_binary(array)
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        else:
            entry["data"] = tensors.encode_json(array)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": result.model, "model_version": result.version, "outputs": outputs}
    if request_id is not None:
        body["id"] = request_id
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    headers = {"X-Model-Version": result.version, "X-Cache": result.cache}
    if not blobs:
        return Response(content, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(len(content))
    return Response(b"".join([content, *blobs]), media_type="application/octet-stream", headers=headers)


def _selection(requested: Any, specs: Sequence[TensorSpec], default: bool) -> list[tuple[str, bool]] | None:
    """``(name, binary)`` of each requested output; ``None`` (every output) when the request names none."""
    if requested is None or requested == []:
        return None
    if not isinstance(requested, list):
        raise InvalidInput("field 'outputs' must be a list of {name, parameters}", field="outputs")
    known = sorted(s.name for s in specs)
    selection = []
    for index, output in enumerate(requested):
        name = output.get("name") if isinstance(output, Mapping) else None
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{index}] must be an object with a name", field="outputs")
        if known and name not in known:
            raise InvalidInput(f"unknown output {name!r}; the model produces {known}", expected=known)
        parameters = _parameters(output.get("parameters"), f"output {name!r}")
        if parameters.get("classification"):
            raise InvalidInput(f"output {name!r}: the classification extension is not supported")
        selection.append((name, parameters.get("binary_data", default) is True))
    return selection


def _parameters(value: Any, owner: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{owner} parameters must be an object", field="parameters")
    return value


def _check_version(name: str, version: str | None, active: ActiveVersion) -> None:
    if version is not None and version != active.version:
        raise ModelNotFound(
            f"model {name!r} version {version!r} is not loaded; loaded version(s): [{active.version!r}]",
            model=name,
            loaded=[active.version],
        )


def _metadata(slot: ModelSlot, version: str | None) -> dict[str, Any]:
    active = slot.active
    if active is None:
        raise NotReady(f"model {slot.name!r} is {slot.state}" + (f": {slot.error}" if slot.error else ""))
    _check_version(slot.name, version, active)
    model = active.model
    return {
        "name": slot.name,
        "versions": [active.version],
        "platform": PLATFORMS.get(model.flavor, f"mlflow_{model.flavor}"),
        "inputs": [_tensor(s) for s in model.inputs],
        "outputs": [_tensor(s) for s in model.outputs],
    }


def _ready(slot: ModelSlot, version: str | None) -> Response:
    if slot.active is not None:
        _check_version(slot.name, version, slot.active)
    ready = slot.state == "ready" and slot.active is not None
    return _json({"name": slot.name, "ready": ready}, 200 if ready else 503)


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": tensors.datatype_of(spec.dtype), "shape": list(spec.shape)}


def _json(body: dict[str, Any], status: int) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
