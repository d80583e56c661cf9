"""``ferry``: ``serve``, ``register-demo``, ``bench``, ``fetch-model``. ``python -m service`` is the same
program."""

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

    fetch = commands.add_parser(
        "fetch-model",
        help="download registered models into folders (KServe storage initializer: SRC DEST [SRC DEST ...])",
    )
    fetch.add_argument(
        "pairs", nargs="+", metavar="SRC DEST", help="models:/NAME@ALIAS, models:/NAME/N or runs:/"
    )

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "fetch-model":
        return _fetch_model(args.pairs)
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


def _fetch_model(pairs: list[str]) -> int:
    """KServe's storage initializer contract: arguments in (source URI, destination folder) pairs. Each
    source is resolved to one version in the registry (``MLFLOW_TRACKING_URI``) and its files land
    directly in the folder, which must be empty or hold that same version already (an init container
    run again). Files arrive in a staging folder first: a failed download leaves nothing that looks
    like a model."""
    import shutil
    import tempfile

    import mlflow

    from service.config import Settings
    from service.errors import FerryError
    from service.registry import ModelRegistry

    logs.configure("info", os.environ.get("FERRY_LOG_FORMAT", "text"))
    if len(pairs) % 2:
        print("ferry fetch-model: give SRC DEST pairs", file=sys.stderr)
        return 2
    registry = ModelRegistry(Settings())
    for src, dest in zip(pairs[::2], pairs[1::2], strict=True):
        if not src.startswith(("models:/", "runs:/")):
            print(f"ferry fetch-model: {src!r} is not a models:/ or runs:/ URI", file=sys.stderr)
            return 2
        target, staging = Path(dest), None
        try:
            ref = registry.resolve(src)
            meta = target / "registered_model_meta"  # MLflow writes it beside a registered model's files
            if (target / "MLmodel").is_file() and meta.is_file():
                lines = (line.partition(":") for line in meta.read_text().splitlines())
                held = {key.strip(): value.strip().strip("'\"") for key, _, value in lines}
                name, version = held.get("model_name"), held.get("model_version")
                if f"models:/{name}/{version}" == ref.source:
                    print(f"{dest} already holds {ref.source}")
                    continue
            target.mkdir(parents=True, exist_ok=True)
            for leftover in target.glob(".ferry-fetch-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if any(target.iterdir()):
                raise FerryError(f"{dest} is not empty")
            staging = Path(tempfile.mkdtemp(prefix=".ferry-fetch-", dir=target))
            try:
                mlflow.artifacts.download_artifacts(artifact_uri=ref.download_uri, dst_path=str(staging))
            except Exception as exc:
                raise FerryError(f"download of {ref.download_uri} failed: {exc}") from exc
            if not (staging / "MLmodel").is_file():
                raise FerryError(f"{ref.download_uri} holds no MLmodel file")
            for entry in staging.iterdir():
                entry.rename(target / entry.name)
        except FerryError as exc:
            print(f"ferry fetch-model: {src}: {exc.message}", file=sys.stderr)
            return 1
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        print(f"fetched {src} (version {ref.version}, {ref.source}) into {dest}")
    return 0


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
