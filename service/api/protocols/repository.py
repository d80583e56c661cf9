"""The Open Inference Protocol's model repository extension (Triton's, which KServe's and Seldon's agents
and ``tritonclient`` call), under ``/v2/repository``: list every model Ferry knows, load one, unload one.

Mounted only with ``FERRY_ADMIN_TOKEN`` set (404 otherwise, like ``/admin``), behind the same bearer
token; the token is checked before any of the body is read (no body parameter: FastAPI reads nothing
before the dependency). Loading and unloading are the admin API's own ``ModelSet`` calls, so a load
waits until the model is ready (200, empty body, as Triton answers) or failed (the error names why; a
model Ferry did not serve before is then not kept, so it cannot hold readiness back).
Errors are v2's ``{"error": "..."}``: 400 for a malformed body, 401, 404 for a model Ferry does not know,
503 ``over_budget`` when the model does not fit the memory budget.

A load names the model's location, when Ferry does not serve it yet or should take it from elsewhere,
with the parameter ``uri`` (``{"parameters": {"uri": "models:/fraud@champion"}}``), or inside Triton's
``config`` parameter, a JSON object as a string (``tritonclient``'s ``load_model(name,
config='{"uri": "models:/fraud@champion"}')``). Without either, a served model is loaded again from its
own URI (resolving its alias anew), and a name Ferry does not serve from ``FERRY_MODEL_REPOSITORY/NAME``
(KServe's model agent downloads a model there, then asks for its load with no body). Triton's ``file:``
parameters (model files in the request) are refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.api.deps import models_of
from service.api.jsonbody import loads_object
from service.api.routes.admin import require_admin
from service.config import Settings
from service.errors import BadRequest, FerryError, ModelNotFound
from service.lifecycle import ModelSlot, ModelState

_LOAD_PARAMETERS = frozenset({"uri", "config"})
_UNLOAD_PARAMETERS = frozenset({"unload_dependents"})
_STATES = {ModelState.READY: "READY", ModelState.LOADING: "LOADING"}
"""Triton's spelling of a model's state; every other state is ``UNAVAILABLE``."""
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"example": {"error": text}}}}
    for code, text in (
        (400, "the body is not what the extension takes (the message names the field)"),
        (401, "missing or invalid credentials"),
        (404, "model 'NAME' is not served; served models: [...]"),
        (503, "the model does not fit the memory budget (FERRY_MEMORY__BUDGET_BYTES)"),
    )
}

router = APIRouter(
    prefix="/v2/repository",
    tags=["open inference protocol v2"],
    dependencies=[Depends(require_admin)],
    responses=_ERRORS,
)


@router.post("/index", summary="Repository index: every model Ferry knows, with its state")
async def index(request: Request) -> Response:
    """``[{name, version, state, reason}]``; ``{"ready": true}`` lists only the models ready now."""
    body = await _body(request)
    ready = body.get("ready", False)
    if not isinstance(ready, bool):
        raise BadRequest("field 'ready' must be true or false", field="ready")
    entries = [_entry(slot) for slot in models_of(request).slots()]
    if ready:
        entries = [e for e in entries if e["state"] == "READY"]
    return Response(orjson.dumps(entries), media_type="application/json")


@router.post("/models/{name}/load", summary="Load a model (from the `uri` parameter, or its own URI)")
async def load(request: Request, name: str) -> Response:
    parameters = _parameters(await _body(request), _LOAD_PARAMETERS, "load")
    uri = _uri(parameters)
    models = models_of(request)
    if uri is None and any(slot.name == name for slot in models.slots()):
        await models.load(name, reason="repository")
        return Response(status_code=200)
    if uri is None:
        uri = _in_repository(request, name)
    new = all(slot.name != name for slot in models.slots())
    try:
        await models.add(name, uri, reason="repository")
    except FerryError:
        if new:  # a model that never loaded is not kept: it would hold readiness back
            with contextlib.suppress(ModelNotFound):
                await models.remove(name, reason="repository")
        raise
    return Response(status_code=200)


@router.post("/models/{name}/unload", summary="Unload a model (it stays listed, UNAVAILABLE)")
async def unload(request: Request, name: str) -> Response:
    parameters = _parameters(await _body(request), _UNLOAD_PARAMETERS, "unload")
    dependents = parameters.get("unload_dependents", False)
    if not isinstance(dependents, bool):  # Ferry's models have no dependents: nothing else to unload
        raise BadRequest("parameter 'unload_dependents' must be true or false", field="unload_dependents")
    await models_of(request).unload(name, reason="repository")
    return Response(status_code=200)


def _in_repository(request: Request, name: str) -> str:
    """The folder ``FERRY_MODEL_REPOSITORY/NAME`` (where KServe's model agent puts a model it downloaded
    before it asks for the load, with no body), or 404 naming where Ferry looked."""
    settings: Settings = request.app.state.settings
    served = sorted(slot.name for slot in models_of(request).slots())
    if settings.model_repository is None:
        raise ModelNotFound(
            f"model {name!r} is not served and the load names no 'uri' (FERRY_MODEL_REPOSITORY is unset); "
            f"served models: {served}",
            model=name,
        )
    root = Path(settings.model_repository)
    folder = root / name
    if name in {".", ".."} or "/" in name or not (folder / "MLmodel").is_file():
        raise ModelNotFound(
            f"model {name!r} is not served and {str(folder)!r} holds no MLflow model "
            f"(FERRY_MODEL_REPOSITORY); served models: {served}",
            model=name,
        )
    return str(folder.resolve())


def _entry(slot: ModelSlot) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": slot.name}
    if slot.active is not None:
        entry["version"] = slot.active.version
    state = _STATES.get(slot.state, "UNAVAILABLE")
    entry["state"] = state
    if state == "UNAVAILABLE":
        why = str(slot.state) if slot.state != ModelState.UNLOADED else "unloaded"
        entry["reason"] = f"{why}: {slot.error}" if slot.error else why
    else:
        entry["reason"] = ""
    return entry


async def _body(request: Request) -> dict[str, Any]:
    """The body as a JSON object; an empty one (``tritonclient``'s index request) is ``{}``."""
    raw = await request.body()
    return loads_object(raw) if raw.strip() else {}


def _parameters(body: Mapping[str, Any], known: frozenset[str], action: str) -> Mapping[str, Any]:
    parameters = body.get("parameters", {})
    if not isinstance(parameters, Mapping):
        raise BadRequest("field 'parameters' must be an object", field="parameters")
    unknown = sorted(set(parameters) - known)
    if unknown:
        files = (
            " (Ferry loads models from a URI, not from files in the request)"
            if any(k.startswith("file:") for k in unknown)
            else ""
        )
        raise BadRequest(
            f"unknown {action} parameter(s) {unknown}{files}; Ferry takes {sorted(known)}",
            field="parameters",
        )
    return parameters


def _uri(parameters: Mapping[str, Any]) -> str | None:
    uri = parameters.get("uri")
    if uri is not None and not isinstance(uri, str):
        raise BadRequest("parameter 'uri' must be a string", field="uri")
    config = parameters.get("config")
    if config is not None:
        if not isinstance(config, str):
            raise BadRequest("parameter 'config' must be a JSON object in a string", field="config")
        try:
            value = orjson.loads(config)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"parameter 'config' is not valid JSON: {exc}", field="config") from None
        if not isinstance(value, dict) or set(value) - {"uri"}:
            raise BadRequest(
                "parameter 'config' must be a JSON object with at most the key 'uri'", field="config"
            )
        nested = value.get("uri")
        if nested is not None and not isinstance(nested, str):
            raise BadRequest("parameter 'config': 'uri' must be a string", field="config")
        if uri is not None and nested is not None and nested != uri:
            raise BadRequest("parameters 'uri' and 'config' name different URIs", field="uri")
        uri = uri or nested
    if uri is not None and not uri.strip():
        raise BadRequest("parameter 'uri' must not be empty", field="uri")
    return uri
