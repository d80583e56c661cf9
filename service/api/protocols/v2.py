"""Open Inference Protocol v2 (KServe, Triton, MLServer clients) under ``/v2``, from the same models.

Health, server and model metadata, model readiness and inference, with the binary tensor data
extension (the model repository extension is ``repository.py``). A version in the path must be the
loaded one (404 naming it otherwise). Errors are the protocol's ``{"error": "..."}``; input that does
not match the model is 400, as KServe and Triton answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from service import __version__
from service.api import tensors
from service.api.deps import cache_control, models_of, read_body, request_key
from service.api.jsonbody import parse_object
from service.api.protocols.base import Codec, Protocol, Route
from service.batcher import Probe
from service.errors import InvalidInput, ModelNotFound, NotReady
from service.lifecycle import ActiveVersion, ModelSlot, ModelState
from service.pipeline import Answer, Call, Decoded
from service.registry import LoadedModel
from service.schemas import v2 as schema
from service.signature import shared_rows

if TYPE_CHECKING:
    from service.runtime.base import TensorSpec

PLATFORMS = {"onnx": "onnxruntime_onnx", "pytorch": "mlflow_pytorch", "pyfunc": "mlflow_pyfunc"}
"""The ``platform`` of a model's metadata, by MLflow flavor."""
EXTENSIONS = ["binary_tensor_data"]
REPOSITORY = "model_repository"
"""The repository extension (``repository.py``): advertised when mounted, with the admin API."""
_HEADER = "inference-header-content-length"
_TRANSPORT = frozenset({"binary_data_output"})
"""Request parameters about the response's encoding: not model parameters, not part of the cache key."""


async def server_metadata(request: Request) -> dict[str, Any]:
    repository = getattr(request.app.state, "admin_keys", None) is not None
    return {"name": "ferry", "version": __version__, "extensions": EXTENSIONS + [REPOSITORY] * repository}


async def server_live() -> dict[str, bool]:
    return {"live": True}


async def server_ready(request: Request) -> Response:
    pipeline = getattr(request.app.state, "pipeline", None)
    ready = pipeline is not None and pipeline.models.ready()
    return _json({"ready": ready}, 200 if ready else 503)


async def model_metadata(request: Request, name: str) -> dict[str, Any]:
    return _metadata(models_of(request).find(name), None)


async def version_metadata(request: Request, name: str, version: str) -> dict[str, Any]:
    return _metadata(models_of(request).find(name), version)


async def model_ready(request: Request, name: str) -> Response:
    return _ready(models_of(request).find(name), None)


async def version_ready(request: Request, name: str, version: str) -> Response:
    return _ready(models_of(request).find(name), version)


async def decode(request: Request, path: Mapping[str, str], gone: Probe | None) -> Call:
    """The raw body and headers; the pipeline has them decoded against the answering version."""
    body = await read_body(request)
    header_length = request.headers.get(_HEADER)

    def inputs_of(model: LoadedModel) -> Decoded:
        header, binary = tensors.split_body(body, header_length)
        parsed = parse_object(bytes(header), arrays=(), tensors=("inputs",))
        arrays = tensors.decode_inputs(model.inputs, parsed.get("inputs"), binary)
        rows = shared_rows(arrays)
        parameters = _parameters(parsed.get("parameters"), "request")
        default_binary = parameters.get("binary_data_output") is True
        selection = _selection(parsed.get("outputs"), model.outputs, default_binary)
        request_id = parsed.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise InvalidInput("field 'id' must be a string", field="id")
        params = {k: v for k, v in parameters.items() if k not in _TRANSPORT} or None
        return Decoded(arrays, rows, params, (request_id, selection, default_binary))

    return Call(
        path["name"],
        "v2",
        inputs_of,
        version=path.get("version"),
        cache=cache_control(request),
        gone=gone,
        key=request_key(request),
    )


def encode(answer: Answer) -> Response:
    request_id, selection, default = answer.extra
    result = answer
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
    if result.form.kind == "frame":  # MLServer's pandas codec: the outputs are a DataFrame's columns
        body["parameters"] = {"content_type": "pd"}
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
    ready = slot.state == ModelState.READY and slot.active is not None
    return _json({"name": slot.name, "ready": ready}, 200 if ready else 503)


def _tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": tensors.datatype_of(spec.dtype), "shape": list(spec.shape)}


def _json(body: dict[str, Any], status: int) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_body(
    status: int, code: str, message: str, details: Mapping[str, Any]
) -> tuple[int, dict[str, Any]]:
    """``{"error": message}``; input that does not match the model is 400, as KServe and Triton answer."""
    if status == HTTPStatus.UNPROCESSABLE_ENTITY:
        status = HTTPStatus.BAD_REQUEST
    return status, {"error": message}


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
CODEC = Codec(decode, encode)
_META = {"response_model": schema.ModelMetadata}
_READY = {"response_model": schema.ModelReady}
ROUTES = (
    Route("GET", "/v2", server_metadata,
          {"summary": "Server metadata", "response_model": schema.ServerMetadata}),
    Route("GET", "/v2/health/live", server_live,
          {"summary": "Server live", "response_model": schema.ServerLive}, metered=False),
    Route("GET", "/v2/health/ready", server_ready,
          {"summary": "Server ready: every model loaded", "response_model": schema.ServerReady},
          metered=False),
    Route("GET", "/v2/models/{name}", model_metadata, {"summary": "Model metadata", **_META}),
    Route("GET", "/v2/models/{name}/versions/{version}", version_metadata,
          {"summary": "Model version metadata", **_META}),
    Route("GET", "/v2/models/{name}/ready", model_ready, {"summary": "Model ready", **_READY}),
    Route("GET", "/v2/models/{name}/versions/{version}/ready", version_ready,
          {"summary": "Model version ready", **_READY}),
    Route("POST", "/v2/models/{name}/infer", CODEC, {"summary": "Inference", **_INFER_DOC}),
    Route("POST", "/v2/models/{name}/versions/{version}/infer", CODEC,
          {"summary": "Inference on a version", **_INFER_DOC}),
)  # fmt: skip
PROTOCOL = Protocol(
    "v2",
    "open inference protocol v2",
    ROUTES,
    error_body,
    owns=lambda path: path == "/v2" or path.startswith("/v2/"),
)
