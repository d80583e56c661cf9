"""``ferry``: ``serve``, ``register-demo``. ``python -m service`` is the same program."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn
from pydantic import ValidationError

from service import __version__, logs

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger("ferry")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ferry", description="Serve MLflow models over HTTP.")
    parser.add_argument("--version", action="version", version=f"ferry {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve models over HTTP")
    serve.add_argument(
        "--model",
        action="append",
        default=None,
        help="name=URI or URI (models:/, runs:/, a model directory, an artifact URI); repeat (FERRY_MODELS)",
    )
    serve.add_argument("--host", help="address to listen on (FERRY_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (FERRY_PORT)")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (FERRY_DEVICE)")

    demo = commands.add_parser("register-demo", help="train and register the demo models (idempotent)")
    demo.add_argument("--models-dir", default="models", help="folder holding register.py (default: models)")

    bench = commands.add_parser(
        "bench", help="side-by-side benchmark (loadtests/bench.py; same as make bench)"
    )
    bench.add_argument("--loadtests-dir", default="loadtests", help="folder holding bench.py")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for bench.py (see --help)")

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "bench":
        return int(_run_script(Path(args.loadtests_dir) / "bench.py", "main", args.bench_args) or 0)
    logs.configure("info", os.environ.get("FERRY_LOG_FORMAT", "text"))
    return int(_run_script(Path(args.models_dir) / "register.py", "main") or 0)


def _serve(args: argparse.Namespace) -> int:
    from service.config import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "device": args.device}.items() if v}
    if args.model:
        overrides["models"] = args.model
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"ferry: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if warning := exposure_warning(settings):
        log.warning(warning)
    if not settings.models:
        print(
            "ferry: no models configured: set FERRY_MODELS or pass --model models:/NAME@ALIAS",
            file=sys.stderr,
        )
        return 2
    from service.api.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=int(max(settings.shutdown.grace_s, 1.0) * 2),
    )
    server = GracefulServer(config, app, settings.shutdown.grace_s)
    if settings.metrics_port is None:
        server.run()
    else:
        asyncio.run(_serve_with_ops(server, app, settings))
    return 0 if server.started else 1


def exposure_warning(settings: Settings) -> str | None:
    """What to warn about when Ferry listens beyond loopback with no API keys (``None``: nothing)."""
    host = settings.host.strip("[]")
    if settings.api_keys is not None or host in ("localhost", "::1") or host.startswith("127."):
        return None
    return (
        f"listening on {settings.host}:{settings.port} without API keys: anyone who can reach this port "
        "can run the models; set FERRY_API_KEYS (see README, Security), or listen on 127.0.0.1"
    )


async def _serve_with_ops(server: GracefulServer, app: Any, settings: Any) -> None:
    """The main server plus the operations routes on ``FERRY_METRICS_PORT``, in one event loop; the
    main server owns the signals and the lifespan, the operations server stops after it."""
    from service.api.app import create_ops_app

    ops = _OpsServer(
        uvicorn.Config(
            create_ops_app(app),
            host=settings.host,
            port=settings.metrics_port,
            access_log=False,
            log_config=None,
            lifespan="off",
        )
    )
    ops_task = asyncio.create_task(ops.serve())
    try:
        await server.serve()
    finally:
        ops.should_exit = True
        await ops_task


class _OpsServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the main server handles signals
        yield


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a grace period: the first SIGTERM/SIGINT turns readiness 503 at once and
    keeps serving for ``grace_s`` seconds, so load balancers stop sending; then uvicorn stops accepting,
    finishes in-flight requests, the lifespan drains the batch queues, and the process exits 0. A second
    signal skips the rest of the grace period."""

    def __init__(self, config: uvicorn.Config, app: Any, grace_s: float) -> None:
        super().__init__(config)
        self._app, self._grace_s = app, grace_s

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                # uvicorn re-raises the signal after shutting down, so the process dies by it; a
                # drained shutdown is a clean exit, status 0.
                self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        pipeline = getattr(self._app.state, "pipeline", None)
        models = pipeline.models if pipeline is not None else None
        if self.should_exit or models is None or models.shutting_down or self._grace_s <= 0:
            super().handle_exit(sig, frame)
            return
        models.shutting_down = True
        log.info("signal %d: readiness is now 503; serving %.1fs more before draining", sig, self._grace_s)
        timer = threading.Timer(self._grace_s, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()


def _run_script(script: Path, function: str, *args: Any) -> Any:
    """Run ``function`` of a repository script (``models/register.py``, ``loadtests/bench.py``): they
    live beside the package, not in it, so an installed Ferry carries no demo or benchmark code."""
    if not script.exists():
        print(f"ferry: {script} not found: run from the repository root or pass its folder", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location(f"ferry_{script.stem}", script)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {script}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(script.parent.resolve()))
    spec.loader.exec_module(module)
    return getattr(module, function)(*args)
