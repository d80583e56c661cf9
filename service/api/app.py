"""``create_app(settings)``: the FastAPI app, its routes, and one lifespan that opens resources in order
and closes them in reverse.

Models load in the background after start-up, so ``/health/live`` answers at once and
``/health/ready`` turns 200 when every model is warmed up. Settings that cannot work (CUDA asked for
where there is none, a malformed model URI) fail start-up instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator.metrics import Info

from service import __version__, swaps
from service.api import docs, errors
from service.api.auth import KeyRing
from service.api.deps import pipeline_of
from service.api.middleware import FastPath
from service.api.protocols import PROTOCOLS, codec_routes, ferry, repository, unmetered_paths
from service.api.protocols.base import declare
from service.api.replay import ResponseCache
from service.api.routes import admin, health, webhooks
from service.cache import build_cache
from service.config import Settings
from service.gpu import GpuCollector, load_nvml
from service.lifecycle import ModelSet
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.registry import ModelRegistry
from service.reloader import Reloader
from service.runtime.torch import cuda_memory
from service.swaps import SwapClient
from service.webhooks import Verifier, WebhookReceiver, read_secret

log = logging.getLogger(__name__)


def create_app(
    settings: Settings, metrics: Metrics | None = None, registry: ModelRegistry | None = None
) -> FastAPI:
    """Build the app; nothing is loaded until the lifespan starts. ``registry`` replaces the MLflow
    registry (tests hand in a fake one with fake runtimes, to test the app in process)."""
    metrics = metrics or Metrics()
    metrics.build_info.info({"version": __version__})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            models_from: ModelRegistry = (
                registry if registry is not None else await asyncio.to_thread(ModelRegistry, settings)
            )
            device = await asyncio.to_thread(models_from.device)
            gpu = GpuCollector(load_nvml(), cuda_memory=cuda_memory if device.startswith("cuda") else None)
            metrics.registry.register(gpu)
            stack.callback(metrics.registry.unregister, gpu)
            stack.callback(gpu.close)
            models = ModelSet(settings, models_from, metrics)
            pipeline = Pipeline(settings, models, build_cache(settings, metrics))
            log.info("serving %d model(s) on %s from %s", len(models.slots()), device, settings.tracking_uri)
            stack.push_async_callback(pipeline.close)
            stack.push_async_callback(models.close)
            app.state.pipeline = pipeline
            coordinator = None
            if (joined := swaps.channel()) is not None:  # a worker: changes are rounds over all workers
                coordinator = SwapClient(joined[0], joined[1], models, models_from)
                await coordinator.connect()  # the committed versions, before anything loads
                models.coordinator = coordinator
                stack.push_async_callback(coordinator.close)
            if settings.grpc_port is not None:  # the same pipeline over gRPC; stopped (drained) first
                from service.grpc.server import GrpcServer

                grpc_server = GrpcServer(settings, pipeline, metrics, shared=coordinator is not None)
                if not getattr(app.state, "grpc_after_load", False):  # a held worker: once loaded
                    await grpc_server.start()
                stack.push_async_callback(grpc_server.stop)
                app.state.grpc_server = grpc_server
            loading = asyncio.create_task(_start(models), name="load-models")
            stack.push_async_callback(_cancel, loading)
            reloader = Reloader(models, models_from, metrics, settings.reload)
            secret = read_secret(settings.reload)  # a bad secret fails start-up, never quoted
            if secret is not None:  # push reloads: the same check, run when MLflow says so
                verifier = Verifier(secret, settings.reload.webhook_max_age_s)
                receiver = WebhookReceiver(verifier, models, reloader, metrics)
                stack.push_async_callback(receiver.close)
                app.state.webhooks = receiver
            champions = coordinator is None or coordinator.leader
            if settings.reload.poll_s > 0 and (champions or settings.challenger.mode != "off"):
                following = asyncio.create_task(reloader.run(champions), name="follow-aliases")
                stack.push_async_callback(_cancel, following)
            yield

    app = FastAPI(
        title="Ferry",
        version=__version__,
        description="Serve MLflow-registered PyTorch and ONNX models: batching, caching, metrics.",
        lifespan=lifespan,
        docs_url=None,  # service/api/docs.py serves /docs without a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    errors.install(app)
    _instrument_http(app, metrics)
    admin_keys = None
    if settings.admin_token is not None:
        admin_keys = KeyRing(settings.admin_token, allow_api_key_header=False)
    app.add_middleware(
        FastPath,
        routes=codec_routes(),
        metrics=metrics,
        keys=KeyRing(settings.api_keys),
        max_body_bytes=settings.limits.max_body_bytes,
        replay=ResponseCache(settings.cache.response_bytes)
        if settings.cache.enabled and settings.cache.response_bytes > 0
        else None,
        admin_keys=admin_keys,
        max_concurrency=settings.limits.max_concurrency,
        uncapped=(*health.PATHS, *unmetered_paths()),  # probes and the scrape answer under overload
        body_timeout_s=settings.limits.body_timeout_s,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    if admin_keys is not None:
        app.state.admin_keys = admin_keys
        app.include_router(admin.router)
        app.include_router(repository.router)  # v2's model repository extension, as protected
    if settings.reload.webhooks:  # off (404) without a secret: the signature is its only authentication
        app.include_router(webhooks.router)
    for protocol in PROTOCOLS:
        declare(app, protocol, pipeline_of)
        if protocol is ferry.PROTOCOL and settings.metrics_port is None:
            app.include_router(health.router)
    docs.install(app)
    return app


def create_ops_app(app: FastAPI) -> FastAPI:
    """``/health/*`` and ``/metrics`` alone, sharing ``app``'s state, for ``FERRY_METRICS_PORT``."""
    ops = FastAPI(title="Ferry operations", openapi_url=None, docs_url=None, redoc_url=None)
    ops.state = app.state
    ops.include_router(health.router)
    return ops


def _instrument_http(app: FastAPI, metrics: Metrics) -> None:
    """HTTP-layer metrics for the routes FastAPI serves, by route template (never the raw path) and
    exact status code; ``/metrics`` and the health routes are left out. The instrumentator sits inside
    ``FastPath``, which records the inference routes into the same metric objects itself: routing
    every hot request through the instrumentator's route matching cost a quarter of the throughput."""

    def record(info: Info) -> None:
        request_bytes = int(info.request.headers.get("content-length") or 0)
        body = getattr(info.response, "body", b"") if info.response is not None else b""
        metrics.observe_http(
            info.modified_handler, info.method, int(info.modified_status), info.modified_duration,
            request_bytes, len(body),
        )  # fmt: skip

    instrumentator = Instrumentator(
        should_group_status_codes=False,
        should_ignore_untemplated=True,
        excluded_handlers=[*health.PATHS, *unmetered_paths()],
        registry=metrics.registry,
    )
    instrumentator.add(record)
    instrumentator.instrument(app)


async def _start(models: ModelSet) -> None:
    """Load the models, then move every object alive so far (frameworks, MLflow, weights: millions of
    objects) out of the garbage collector's sight. Without this, each full collection walks them all
    and stalls the event loop for a large fraction of a second, which is most of the p99 latency."""
    await models.start()
    gc.collect()
    gc.freeze()


def route_table(app: FastAPI) -> dict[str, set[str]]:
    """Every served path (templates such as ``/models/{name}``) with its methods, included routers too."""
    table: dict[str, set[str]] = {}

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if hasattr(route, "original_router"):  # FastAPI's included router
                walk(route.original_router.routes, prefix + route.include_context.prefix)
            elif hasattr(route, "path"):
                table.setdefault(prefix + route.path, set()).update(getattr(route, "methods", None) or ())

    walk(list(app.routes), "")
    return table


async def _cancel(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if not task.cancelled() and task.exception() is not None:
        log.error("model loading failed: %r", task.exception())
