"""What a protocol module declares: its routes (one table drives both the fast ASGI path and the
OpenAPI declarations), which paths it owns, and its error body.

An inference route is a codec: ``decode(request, path, gone) -> Call`` and ``encode(answer) ->
Response``; ``FastPath`` runs ``decode``, ``Pipeline.infer`` and ``encode`` for it, and the same route is
declared on FastAPI (``declare``) so OpenAPI and the docs show it. Every other route is a plain FastAPI
endpoint.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from service.batcher import Probe
from service.pipeline import Answer, Call

Decode = Callable[[Request, Mapping[str, str], Probe | None], Awaitable[Call]]
Encode = Callable[[Answer], Response]
ErrorBody = Callable[[int, str, str, Mapping[str, Any]], tuple[int, dict[str, Any]]]
"""``(status, code, message, details) -> (status, body)``: a protocol may answer another status."""


def json_default(value: Any) -> Any:
    """What orjson does not write natively (with ``OPT_SERIALIZE_NUMPY``): arrays of strings or objects
    (a table's string columns, a classifier's labels), the bytes in them, and numpy scalars in objects."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@dataclass(frozen=True, slots=True)
class Codec:
    """An inference route's way from request to ``Call`` and from ``Answer`` to response."""

    decode: Decode
    encode: Encode


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    """A template such as ``/v2/models/{name}/infer``."""
    endpoint: Callable[..., Any] | Codec
    """A codec (an inference route, served by ``FastPath``) or a FastAPI endpoint."""
    doc: Mapping[str, Any] = field(default_factory=dict)
    """FastAPI route arguments: summary, response_model, responses, openapi_extra, response_class."""
    metered: bool = True
    """False for probes: left out of the HTTP metrics."""

    @property
    def codec(self) -> Codec | None:
        return self.endpoint if isinstance(self.endpoint, Codec) else None

    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.path))


@dataclass(frozen=True, slots=True)
class Protocol:
    name: str
    """``ferry``, ``v2`` or ``mlflow``."""
    tag: str
    """OpenAPI tag of its routes."""
    routes: Sequence[Route]
    error_body: ErrorBody
    owns: Callable[[str], bool]
    """Whether a path (served or not) is this protocol's: its errors then take this protocol's body."""


def owns_routes(routes: Sequence[Route]) -> Callable[[str], bool]:
    """A protocol that owns exactly the paths its routes match."""
    exact = frozenset(r.path for r in routes if "{" not in r.path)
    patterns = [r.pattern() for r in routes if "{" in r.path]
    return lambda path: path in exact or any(p.fullmatch(path) for p in patterns)


def declare(app: FastAPI, protocol: Protocol, pipeline_of: Callable[[Request], Any]) -> None:
    """Declare every route of ``protocol`` on FastAPI. A codec route gets an endpoint that runs the
    codec through the pipeline (what ``FastPath`` does without FastAPI's per-route machinery)."""
    for route in protocol.routes:
        endpoint = route.endpoint
        if isinstance(endpoint, Codec):
            endpoint = _codec_endpoint(endpoint, route.path, pipeline_of)
        doc = {"tags": [protocol.tag], **route.doc}
        app.add_api_route(route.path, endpoint, methods=[route.method], **doc)


def _codec_endpoint(codec: Codec, path: str, pipeline_of: Callable[[Request], Any]) -> Callable[..., Any]:
    names = re.findall(r"\{(\w+)\}", path)

    async def endpoint(request: Request, **params: str) -> Response:
        call = await codec.decode(request, params, None)
        return codec.encode(await pipeline_of(request).infer(call))

    parameters = [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)]
    parameters += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=str) for n in names]
    endpoint.__signature__ = inspect.Signature(parameters, return_annotation=Response)  # type: ignore[attr-defined]
    return endpoint
