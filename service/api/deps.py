"""One-line typed dependencies, so routes stay thin and tests can swap collaborators.

Codecs (``api/protocols/``) take the ``Request`` itself and call ``pipeline_of``, ``cache_control`` and
``json_object`` directly, since ``FastPath`` calls them without FastAPI's dependency solving.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.requests import ClientDisconnect

from service.api.jsonbody import parse_object
from service.errors import NotReady
from service.lifecycle import ModelSet
from service.pipeline import Pipeline


def pipeline_of(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise NotReady("the service is starting")
    return pipeline


def request_key(request: Request) -> str | None:
    """The request key header's value (``FERRY_CHALLENGER__KEY_HEADER``), which keeps a client on one
    side of a canary; ``None`` when absent or empty."""
    return header(request, pipeline_of(request).key_header_name) or None


def header(request: Request, name: bytes) -> str | None:
    """The first value of the header ``name`` (lower case), as ``request.headers.get`` reads it, without
    building starlette's ``Headers`` (a lookup on every inference request)."""
    pairs: list[tuple[bytes, bytes]] = request.scope["headers"]
    for key, value in pairs:
        if key == name:
            return value.decode("latin-1")
    return None


def models_of(request: Request) -> ModelSet:
    return pipeline_of(request).models


async def get_models(request: Request) -> ModelSet:
    return models_of(request)


Models = Annotated[ModelSet, Depends(get_models)]


def cache_control(request: Request) -> str | None:
    """``no-store`` or ``no-cache`` when the request's ``Cache-Control`` asks for it, else ``None``."""
    value = header(request, b"cache-control")
    if not value:
        return None
    directives = {part.strip().lower() for part in value.split(",")}
    if "no-store" in directives:
        return "no-store"
    return "no-cache" if "no-cache" in directives else None


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, ``inputs`` decoded straight to arrays where it can be (400 if it is not
    JSON or not an object): ``api/jsonbody.py``."""
    return parse_object(await read_body(request))


async def read_body(request: Request) -> bytes:
    """``await request.body()`` without its async generator (``Request.stream``), which costs more than
    the read itself for a body that arrived whole: the same messages read, the same ``ClientDisconnect``
    when the client hangs up first, and the body kept on the request for later reads, as starlette
    keeps it."""
    cached: bytes | None = getattr(request, "_body", None)
    if cached is not None:
        return cached
    if request._stream_consumed:
        return await request.body()  # starlette's error: the stream was read another way
    chunks: list[bytes] = []
    while not request._stream_consumed:
        message = await request.receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if not message.get("more_body", False):
                request._stream_consumed = True
            if chunk:
                chunks.append(chunk)
        elif message["type"] == "http.disconnect":
            request._is_disconnected = True
            raise ClientDisconnect()
    data = b"".join(chunks)
    request._body = data
    return data
