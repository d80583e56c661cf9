"""``FastPath``: serve the inference routes straight from ASGI.

FastAPI's per-route machinery (dependency solving, query and cookie parsing, its exit stacks) costs
about as much per request as the whole of a small model's inference: on a 2-core machine a FastAPI
endpoint that parses JSON and returns a constant answers about 7,000 requests/s, a bare ASGI one about
19,000. The inference routes are codecs in the protocol table (``api/protocols/``), declared on the
FastAPI app from that same table (so OpenAPI, docs and the route table show them); this middleware runs
a matching route's codec and the pipeline directly (decode, ``Pipeline.infer``, encode), with the same
error rendering. Every other route goes through FastAPI.

It also hands the pipeline, in the ``Call``, a probe of whether the request's client hung up, so rows
still queued for a departed client are dropped instead of computed: under overload, clients that time
out and retry would otherwise make the model compute answers nobody reads.

For every route it bounds what a request may hold: at most ``FERRY_LIMITS__MAX_CONCURRENCY`` requests
in flight at once (beyond it 503 with ``Retry-After``, before any of the body is read; the probes and
``/metrics`` are not counted, so an overloaded server still answers them), a body no larger than
``FERRY_LIMITS__MAX_BODY_BYTES`` and whole within ``FERRY_LIMITS__BODY_TIMEOUT_S`` of its first read
(else 408). uvicorn bounds neither a body's time nor a connection's headers; the headers' bound is in
the HTTP protocol Ferry runs (``service/cli.py``), which also closes a connection whose request was
answered before its body was read, so such an answer carries ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import errors
from service.api.auth import KeyRing
from service.api.deps import header, pipeline_of, read_body
from service.api.protocols.base import Codec, Route
from service.api.replay import ResponseCache
from service.batcher import Probe
from service.errors import ClientGone, FerryError, Overloaded, PayloadTooLarge, RequestTimeout
from service.metrics import Metrics, fast_inc


class FastPath:
    """Dispatch ``(method, path template, endpoint)`` routes before FastAPI's router."""

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[tuple[Route, Codec]],
        metrics: Metrics,
        keys: KeyRing,
        max_body_bytes: int,
        replay: ResponseCache | None = None,
        admin_keys: KeyRing | None = None,
        *,
        max_concurrency: int = 0,
        uncapped: Collection[str] = (),
        body_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self._admin_keys = admin_keys
        self._replay = replay
        self._metrics = metrics
        self._keys = keys
        self._max_body = max_body_bytes
        self._cap, self._uncapped, self.in_flight = max_concurrency, frozenset(uncapped), 0
        self._body_timeout_s = body_timeout_s
        self._busy = metrics.http_rejected.labels("concurrency")
        self._body_late = metrics.http_rejected.labels("body_timeout")
        inprogress = metrics.http_inprogress
        self._exact: dict[tuple[str, str], _Route] = {}
        self._patterns: list[tuple[str, re.Pattern[str], _Route]] = []
        for declared, codec in routes:
            method, template = declared.method, declared.path
            route = _Route(codec, template, fast_inc(inprogress.labels(template, method)))
            if "{" in template:
                self._patterns.append((method, declared.pattern(), route))
            else:
                self._exact[(method, template)] = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._cap or scope["path"] in self._uncapped:
            await self._dispatch(scope, receive, send)
            return
        if self.in_flight >= self._cap:
            await self._refuse_busy(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self._dispatch(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = self._match(scope["method"], scope["path"])
        # Every route: a body stops at the size limit and must arrive in time.
        bounded = _bounded(receive, self._max_body, self._body_timeout_s, self._body_late.inc)
        if match is not None:
            gone = hangup_probe(receive)  # from uvicorn's own receive, before it is wrapped
            await self._serve(scope, bounded, send, gone, *match)
            return
        receive = bounded
        try:
            # The admin token before any of the body is read: an unauthenticated client cannot make
            # the server buffer a body.
            if self._admin_keys is not None and _is_admin(scope["path"]):
                self._admin_keys.check(Request(scope, receive))
            declared = _content_length(scope)
            if declared is not None and declared > self._max_body:
                raise PayloadTooLarge(_too_large(self._max_body))
        except FerryError as exc:
            response = await errors.ferry_error(Request(scope, receive), exc)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        gone: Probe | None,
        route: _Route,
        params: dict[str, str],
    ) -> None:
        started = time.perf_counter()
        request = Request(scope, receive)
        declared = _content_length(scope)
        route.inprogress(1)
        try:
            if self._keys.enabled:
                self._keys.check(request)
            if declared is not None and declared > self._max_body:
                raise PayloadTooLarge(_too_large(self._max_body))  # before reading any of the body
            response = await self._answer(scope, request, route, params, gone)
        except FerryError as exc:
            response = await errors.ferry_error(request, exc)
        except ClientDisconnect:  # hung up before its whole body arrived: nobody reads an answer
            response = await errors.ferry_error(request, ClientGone(_GONE_MID_BODY))
        except Exception as exc:
            response = await errors.unexpected_error(request, exc)
        finally:
            route.inprogress(-1)
        await response(scope, receive, send)
        self._metrics.observe_http(
            route.template, scope["method"], response.status_code, time.perf_counter() - started,
            declared or 0, len(response.body),
        )  # fmt: skip

    async def _refuse_busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """503 with Retry-After in the body shape of the path's protocol; none of the body is read (the
        HTTP protocol then closes the connection instead of reading the body it was sent)."""
        started = time.perf_counter()
        self._busy.inc()
        request = Request(scope, receive)
        response = await errors.ferry_error(
            request,
            Overloaded(
                f"more than {self._cap} requests in flight (FERRY_LIMITS__MAX_CONCURRENCY); retry later"
            ),
        )
        await response(scope, receive, send)
        match = self._match(scope["method"], scope["path"])
        if match is not None:  # counted with the route's other answers, as FastPath counts them
            self._metrics.observe_http(
                match[0].template, scope["method"], response.status_code, time.perf_counter() - started,
                _content_length(scope) or 0, len(response.body),
            )  # fmt: skip

    async def _answer(
        self, scope: Scope, request: Request, route: _Route, params: dict[str, str], gone: Probe | None
    ) -> Response:
        """The codec's answer through the pipeline, or a replay of it when the same request was answered
        before."""
        codec, replay = route.codec, self._replay
        if replay is None or header(request, b"cache-control"):
            pipeline = pipeline_of(request)
            return codec.encode(await pipeline.infer(await codec.decode(request, params, gone)))
        pipeline = pipeline_of(request)
        key = replay.key(scope, await read_body(request), pipeline.models.generation)
        entry = replay.get(key)
        if entry is not None:
            entry.answer.metrics.replayed(entry.answer.protocol, entry.answer.rows)
            return entry.response()
        answer = await pipeline.infer(await codec.decode(request, params, gone))
        response = codec.encode(answer)
        replay.put(key, response, answer)
        return response

    def _match(self, method: str, path: str) -> tuple[_Route, dict[str, str]] | None:
        route = self._exact.get((method, path))
        if route is not None:
            return route, {}
        for want, pattern, route in self._patterns:
            if want == method and (m := pattern.fullmatch(path)):
                return route, m.groupdict()
        return None


def hangup_probe(receive: Receive) -> Probe | None:
    """A probe that turns true once the request's client has disconnected, or ``None`` if this server
    cannot tell. uvicorn hands the app its request cycle's bound ``receive``, and the cycle's
    ``disconnected`` flips when the connection drops (tests/integration/test_hangup.py pins this down
    on the uvicorn version Ferry ships with)."""
    cycle = getattr(receive, "__self__", None)
    if cycle is None or not isinstance(getattr(cycle, "disconnected", None), bool):
        return None
    return lambda: cycle.disconnected


_GONE_MID_BODY = "the client hung up before sending its whole body"


def _is_admin(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _too_large(limit: int) -> str:
    return f"request body is larger than the limit of {limit} bytes (FERRY_LIMITS__MAX_BODY_BYTES)"


def _bounded(receive: Receive, limit: int, timeout_s: float, timed_out: Callable[[], None]) -> Receive:
    """``receive`` that stops a body (chunked ones too) as soon as it passes ``limit`` bytes, and raises
    ``RequestTimeout`` (calling ``timed_out`` once) when the whole body has not arrived ``timeout_s``
    after the first read. Once the body is complete, reads (which then wait for the client to hang up)
    are not bounded."""
    seen, complete, deadline, late = 0, False, 0.0, False
    cycle = getattr(receive, "__self__", None)  # uvicorn's request cycle, as in ``hangup_probe``

    async def bounded() -> Message:
        nonlocal seen, complete, deadline, late
        if complete or getattr(cycle, "more_body", True) is False:
            # The rest of the body is in memory already (uvicorn answers at once): no timer to arm,
            # which is every small request's case.
            message = await receive()
        else:
            if late:
                raise _BodyLate(_late(timeout_s))
            loop = asyncio.get_running_loop()
            if not deadline:
                deadline = loop.time() + timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                late = True
                timed_out()
                raise _BodyLate(_late(timeout_s)) from None
        if not complete:
            if message["type"] != "http.request":
                complete = True  # the client hung up: nothing more will arrive
            else:
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(_too_large(limit))
                complete = not message.get("more_body", False)
        return message

    return bounded


class _BodyLate(RequestTimeout, HTTPException):
    """``RequestTimeout`` from reading a body. Also an ``HTTPException``, which FastAPI's own body parsing
    re-raises as it is (it turns any other exception into a 400 "error parsing the body"); Ferry's
    handler of ``FerryError`` comes first in the class's order, so it renders it."""

    def __init__(self, message: str) -> None:
        HTTPException.__init__(self, self.status, message)
        self.message, self.details = message, {}


class _BodyTooLarge(PayloadTooLarge, HTTPException):
    """``PayloadTooLarge`` from reading a body, passed through FastAPI's body parsing (see ``_BodyLate``)."""

    def __init__(self, message: str) -> None:
        HTTPException.__init__(self, self.status, message)
        self.message, self.details = message, {}


def _late(timeout_s: float) -> str:
    return (
        f"the request's body did not arrive within {timeout_s:g} s (FERRY_LIMITS__BODY_TIMEOUT_S); "
        "the connection is closed"
    )


@dataclass(frozen=True, slots=True)
class _Route:
    codec: Codec
    template: str
    inprogress: Callable[[float], None]
    """Adds to the route's in-progress gauge (``fast_inc`` of its child)."""
