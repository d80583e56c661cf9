"""The protocols Ferry speaks, one module each, and the one table of them.

Each module declares its routes (inference routes as codecs), the paths it owns and its error body;
``PROTOCOLS`` is the only list of them: ``FastPath`` serves the codec routes from it, ``create_app``
declares every route from it (OpenAPI, docs), the HTTP metrics leave out its probes, and error bodies
are chosen by it. A new protocol is a new module and one entry here.
"""

from __future__ import annotations

from service.api.protocols import ferry, mlflow, v2
from service.api.protocols.base import Codec, Protocol, Route

PROTOCOLS: tuple[Protocol, ...] = (ferry.PROTOCOL, v2.PROTOCOL, mlflow.PROTOCOL)
"""In the order of the OpenAPI document."""


def protocol_of(path: str) -> Protocol:
    """The protocol whose error body a request to ``path`` gets: the one that owns it, else Ferry's own."""
    for protocol in PROTOCOLS:
        if protocol.owns(path):
            return protocol
    return ferry.PROTOCOL


def codec_routes() -> list[tuple[Route, Codec]]:
    """Every inference route, for ``FastPath``."""
    return [(r, r.codec) for p in PROTOCOLS for r in p.routes if r.codec is not None]


def unmetered_paths() -> list[str]:
    """Paths of the probes, which the HTTP metrics leave out."""
    return [r.path for p in PROTOCOLS for r in p.routes if not r.metered]
