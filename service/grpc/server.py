"""``GrpcServer``: ``inference.GRPCInferenceService`` (the Open Inference Protocol over gRPC) on
``FERRY_GRPC_PORT``, a ``grpc.aio`` server in the HTTP server's event loop, answering from the app's own
``Pipeline`` (the app's lifespan starts and stops it: ``service/api/app.py``).

What REST's ``FastPath`` bounds, it bounds too: a message no larger than ``FERRY_LIMITS__MAX_BODY_BYTES``
(gRPC itself refuses a larger one, ``RESOURCE_EXHAUSTED``, before any of it is parsed), at most
``FERRY_LIMITS__MAX_CONCURRENCY`` calls in flight besides the health probes (then ``UNAVAILABLE``; the
count is this server's own, beside HTTP's), an API key (``FERRY_API_KEYS``) in the ``authorization``
(``Bearer``) or ``x-api-key`` metadata of ``ModelInfer``, and the client's deadline as the request's when it
is earlier than ``FERRY_BATCH__TIMEOUT_MS``. Ferry's errors keep their message and take the status code
of their HTTP status (``STATUS``). The model repository RPCs are not served (``UNIMPLEMENTED``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import grpc
import grpc.aio

from service import __version__
from service.api.auth import KeyRing
from service.api.protocols import v2
from service.config import Settings
from service.errors import ConfigurationError, FerryError, ModelNotFound, Overloaded
from service.grpc import messages
from service.grpc.codec import call_of, response_of
from service.lifecycle import ModelState
from service.metrics import Metrics
from service.pipeline import Pipeline

log = logging.getLogger(__name__)

STATUS: dict[int, grpc.StatusCode] = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.UNPROCESSABLE_ENTITY: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    HTTPStatus.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    # What gRPC itself answers a message above the size limit: one code for "too large", whichever
    # limit (the message's bytes, FERRY_LIMITS__MAX_ROWS) refused it.
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.REQUEST_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    HTTPStatus.GATEWAY_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    499: grpc.StatusCode.CANCELLED,
}
"""The gRPC status code of each HTTP status Ferry's errors carry; any other (500) is ``INTERNAL``."""
PROBES = frozenset({"ServerLive", "ServerReady", "ModelReady"})
"""Methods the concurrency cap leaves out, as HTTP's probes: an overloaded server still answers them."""

Handler = Callable[[Any, Any], Awaitable[Any]]


def status_of(error: FerryError) -> grpc.StatusCode:
    return STATUS.get(int(error.status), grpc.StatusCode.INTERNAL)


class GrpcServer:
    """The gRPC server of one app: ``await start()`` binds and serves, ``await stop()`` drains."""

    def __init__(
        self, settings: Settings, pipeline: Pipeline, metrics: Metrics, shared: bool = False
    ) -> None:
        """``shared``: a worker process, one of several that listen on the same port (``SO_REUSEPORT``)."""
        assert settings.grpc_port is not None
        self._host, self._port = settings.host, settings.grpc_port
        self._pipeline, self._metrics = pipeline, metrics
        self._keys = KeyRing(settings.api_keys)
        self._cap, self.in_flight = settings.limits.max_concurrency, 0
        self._grace_s = max(settings.shutdown.grace_s, 1.0) * 2  # uvicorn's timeout_graceful_shutdown
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.limits.max_body_bytes),
                # One process: a port in use fails start-up instead of being shared. Workers share the port:
                # the kernel spreads new connections over their sockets.
                ("grpc.so_reuseport", 1 if shared else 0),
            ]
        )
        methods: dict[str, Handler] = {
            "ServerLive": self._server_live,
            "ServerReady": self._server_ready,
            "ModelReady": self._model_ready,
            "ServerMetadata": self._server_metadata,
            "ModelMetadata": self._model_metadata,
            "ModelInfer": self._model_infer,
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._guarded(name, method),
                request_deserializer=messages.METHODS[name][0].FromString,
                response_serializer=messages.METHODS[name][1].SerializeToString,
            )
            for name, method in methods.items()
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(messages.SERVICE, handlers),)
        )
        self.port: int | None = None

    async def start(self) -> int:
        """Bind ``FERRY_HOST``:``FERRY_GRPC_PORT`` and serve; the port it listens on."""
        host = f"[{self._host}]" if ":" in self._host and not self._host.startswith("[") else self._host
        address = f"{host}:{self._port}"
        try:
            port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigurationError(f"cannot listen for gRPC on {address} (FERRY_GRPC_PORT): {exc}") from exc
        if port == 0:
            raise ConfigurationError(f"cannot listen for gRPC on {address} (FERRY_GRPC_PORT)")
        await self._server.start()
        self.port = int(port)
        log.info("gRPC (Open Inference Protocol, inference.GRPCInferenceService) on %s:%d", host, port)
        return self.port

    async def stop(self) -> None:
        """Refuse new calls and let those in flight finish (at most uvicorn's graceful shutdown time)."""
        if self.port is not None:
            await self._server.stop(self._grace_s)

    # every method ------------------------------------------------------------------------------------

    def _guarded(self, name: str, method: Handler) -> Handler:
        """``method`` within the concurrency cap, with Ferry's errors as status codes, counted in
        ``ferry_grpc_requests_total``."""
        counted = name not in PROBES and self._cap > 0
        codes = {code: self._metrics.grpc_requests.labels(name, code.name) for code in grpc.StatusCode}

        async def guarded(request: Any, context: Any) -> Any:
            error: FerryError | None = None
            if counted and self.in_flight >= self._cap:
                error = Overloaded(
                    f"more than {self._cap} gRPC calls in flight (FERRY_LIMITS__MAX_CONCURRENCY); retry later"
                )
            else:
                self.in_flight += counted
                try:
                    response = await method(request, context)
                except FerryError as exc:
                    error = exc
                except asyncio.CancelledError:
                    codes[grpc.StatusCode.CANCELLED].inc()
                    raise
                except Exception as exc:
                    log.exception("gRPC %s failed", name)
                    error = FerryError(f"internal error: {type(exc).__name__}")
                finally:
                    self.in_flight -= counted
            if error is None:
                codes[grpc.StatusCode.OK].inc()
                return response
            code = status_of(error)
            codes[code].inc()
            retry_after = getattr(error, "retry_after_s", None)
            if retry_after is not None:
                context.set_trailing_metadata((("retry-after", str(retry_after)),))
            await context.abort(code, error.message)

        return guarded

    # the methods ---------------------------------------------------------------------------------------

    async def _server_live(self, request: Any, context: Any) -> Any:
        return messages.ServerLiveResponse(live=True)

    async def _server_ready(self, request: Any, context: Any) -> Any:
        return messages.ServerReadyResponse(ready=self._pipeline.models.ready())

    async def _model_ready(self, request: Any, context: Any) -> Any:
        """Ready or not, never an error (Triton's answer for a model it does not serve)."""
        try:
            slot = self._pipeline.models.find(request.name)
        except ModelNotFound:
            return messages.ModelReadyResponse(ready=False)
        active = slot.active
        ready = (
            slot.state == ModelState.READY and active is not None and request.version in ("", active.version)
        )
        return messages.ModelReadyResponse(ready=ready)

    async def _server_metadata(self, request: Any, context: Any) -> Any:
        # The repository extension is REST's only: its RPCs are not served here.
        return messages.ServerMetadataResponse(name="ferry", version=__version__, extensions=v2.EXTENSIONS)

    async def _model_metadata(self, request: Any, context: Any) -> Any:
        meta = v2._metadata(self._pipeline.models.find(request.name), request.version or None)
        response = messages.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for spec in meta["inputs"]:
            response.inputs.add(**spec)
        for spec in meta["outputs"]:
            response.outputs.add(**spec)
        return response

    async def _model_infer(self, request: Any, context: Any) -> Any:
        if self._keys.enabled:
            metadata = context.invocation_metadata() or ()
            self._keys.check_headers({k: v for k, v in metadata if isinstance(v, str)})
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        wanted = self._pipeline.key_header.lower()  # gRPC metadata keys are lower case
        key = next(
            (v for k, v in context.invocation_metadata() or () if k == wanted and isinstance(v, str)), None
        )
        call = call_of(request, deadline=deadline, gone=context.cancelled, key=key or None)
        return response_of(await self._pipeline.infer(call))
