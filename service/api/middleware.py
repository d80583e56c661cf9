"""``FastPath``: serve the inference routes straight from ASGI.

FastAPI's per-route machinery (dependency solving, query and cookie parsing, its exit stacks) costs
about as much per request as the whole of a small model's inference: on a 2-core machine a FastAPI
endpoint that parses JSON and returns a constant answers about 7,000 requests/s, a bare ASGI one about
19,000. The inference routes are declared on the FastAPI app like every other route (so OpenAPI, docs
and the route table show them), and this middleware calls the very same endpoint functions directly
when method and path match, with the same error rendering. Every other route goes through FastAPI.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import errors
from service.errors import FerryError

Endpoint = Callable[..., Awaitable[Response]]


class FastPath:
    """Dispatch ``(method, path template, endpoint)`` routes before FastAPI's router."""

    def __init__(self, app: ASGIApp, routes: Sequence[tuple[str, str, Endpoint]]) -> None:
        self.app = app
        self._exact: dict[tuple[str, str], Endpoint] = {}
        self._patterns: list[tuple[str, re.Pattern[str], Endpoint]] = []
        for method, template, endpoint in routes:
            if "{" in template:
                regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
                self._patterns.append((method, re.compile(regex), endpoint))
            else:
                self._exact[(method, template)] = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            match = self._match(scope["method"], scope["path"])
            if match is not None:
                endpoint, params = match
                request = Request(scope, receive)
                try:
                    response = await endpoint(request, **params)
                except FerryError as exc:
                    response = await errors.ferry_error(request, exc)
                except Exception as exc:
                    response = await errors.unexpected_error(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _match(self, method: str, path: str) -> tuple[Endpoint, dict[str, Any]] | None:
        endpoint = self._exact.get((method, path))
        if endpoint is not None:
            return endpoint, {}
        for want, pattern, endpoint in self._patterns:
            if want == method and (m := pattern.fullmatch(path)):
                return endpoint, m.groupdict()
        return None
