"""``ferry``: ``serve``, ``register-demo``, ``bench``, ``fetch-model``, ``check``. ``python -m service`` is
the same program."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import __version__, logs

if TYPE_CHECKING:
    from service.config import LimitSettings, Settings
    from service.metrics import Metrics

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
    serve.add_argument(
        "--workers", help="serving processes on the port: N >= 1 or auto (FERRY_WORKERS; default 1)"
    )

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

    check = commands.add_parser(
        "check",
        help="compare a model version with the one it would replace and judge it by a policy (exit 1: fails)",
        description="Load CANDIDATE as ferry serve would, run it and the compared version on the same rows, "
        "and report agreement, accuracy, latency, throughput, load time and memory. Exit 0: every check "
        "passed; 1: a check failed (a candidate that does not load or run included); 2: the check could "
        "not run.",
    )
    check.add_argument(
        "candidate", metavar="CANDIDATE", help="models:/NAME/VERSION, models:/NAME@ALIAS or any model URI"
    )
    check.add_argument(
        "--against",
        metavar="ALIAS_OR_URI",
        help="an alias of the candidate's registered model (champion) or a model URI "
        "(default: models:/NAME@champion when it exists, else no comparison)",
    )
    check.add_argument(
        "--data", metavar="FILE", help="reference data set: .csv, .parquet or .jsonl (default: input example)"
    )
    check.add_argument("--label", metavar="COLUMN", help="label column of --data: accuracy against it")
    check.add_argument(
        "--report", metavar="DIR", default="check-report", help="report folder (default: check-report)"
    )
    check.add_argument("--policy", metavar="FILE", help="thresholds, TOML (default: the documented defaults)")
    check.add_argument(
        "--requests", type=int, default=100, metavar="N", help="timed calls per batch size (default: 100)"
    )

    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "fetch-model":
        return _fetch_model(args.pairs)
    if args.command == "bench":
        return int(_run_script(Path(args.loadtests_dir) / "bench.py", "main", args.bench_args) or 0)
    logs.configure("info", os.environ.get("FERRY_LOG_FORMAT", "text"))
    return int(_run_script(Path(args.models_dir) / "register.py", "main") or 0)


def _serve(args: argparse.Namespace) -> int:
    from service.config import Settings, describe_invalid

    given = {"host": args.host, "port": args.port, "device": args.device, "workers": args.workers}
    overrides = {k: v for k, v in given.items() if v is not None and v != ""}
    if args.model:
        overrides["models"] = args.model
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        print(f"ferry: invalid settings:\n{describe_invalid(exc)}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    from service import workers

    if (sockets := workers.inherited_sockets()) is not None:  # a worker the supervisor started
        status = serve_app(
            settings, sockets=sockets[:1], ops_sockets=sockets[1:], hold_until_loaded=workers.holds()
        )
        return 0 if status == 0 else workers.BOOT_FAILED
    if warning := exposure_warning(settings):
        log.warning(warning)
    if not settings.models:
        print(
            "ferry: no models configured: set FERRY_MODELS or pass --model models:/NAME@ALIAS",
            file=sys.stderr,
        )
        return 2
    if settings.workers != 1 and workers.worker_count(settings)[0] > 1:
        # the workers read their settings from the environment: the flags travel there
        env = dict(os.environ)
        for key, value in overrides.items():
            env[f"FERRY_{key.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
        return workers.supervise(settings, env)
    return serve_app(settings)


def serve_app(
    settings: Settings,
    sockets: list[socket.socket] | None = None,
    ops_sockets: list[socket.socket] | None = None,
    hold_until_loaded: bool = False,
) -> int:
    """One serving process: the app on ``settings.host:port``, or on ``sockets`` a supervisor bound
    (``service/workers.py``; ``ops_sockets`` for ``FERRY_METRICS_PORT``). ``hold_until_loaded``: accept
    connections only once no model is still loading."""
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
        **connection_limits(settings.limits, app.state.metrics),
    )
    server = GracefulServer(config, app, settings.shutdown.grace_s)
    if hold_until_loaded:
        from service.workers import hold_until_loaded as hold

        hold(app, lambda: server.should_exit)
    if settings.metrics_port is None:
        server.run(sockets=sockets)
    else:
        asyncio.run(_serve_with_ops(server, app, settings, sockets, ops_sockets))
    return 0 if server.started else 1


def _check(args: argparse.Namespace) -> int:
    from service.check.command import Options, run

    return run(
        Options(
            candidate=args.candidate,
            against=args.against,
            data=args.data,
            label=args.label,
            report=args.report,
            policy=args.policy,
            requests=args.requests,
        )
    )


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
    grpc = f" (and gRPC on :{settings.grpc_port})" if settings.grpc_port is not None else ""
    return (
        f"listening on {settings.host}:{settings.port}{grpc} without API keys: anyone who can reach this "
        "port can run the models; set FERRY_API_KEYS (see README, Security), or listen on 127.0.0.1"
    )


async def _serve_with_ops(
    server: GracefulServer,
    app: Any,
    settings: Any,
    sockets: list[socket.socket] | None = None,
    ops_sockets: list[socket.socket] | None = None,
) -> None:
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
            **connection_limits(settings.limits, app.state.metrics),
        )
    )
    ops_task = asyncio.create_task(ops.serve(sockets=ops_sockets or None))
    try:
        await server.serve(sockets=sockets)
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
        protocol = getattr(self.config, "http_protocol_class", None)
        if isinstance(protocol, type) and issubclass(protocol, GuardedHttpProtocol):
            protocol.draining = True  # answers close their connections: kept-alive clients move on now
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


def connection_limits(limits: LimitSettings, metrics: Metrics) -> dict[str, Any]:
    """uvicorn settings of a server Ferry runs: its HTTP protocol with Ferry's connection bounds, and
    the keep-alive timeout."""
    return {
        "http": guarded_http(limits, metrics),
        # uvicorn declares an int but only hands it to call_later, which takes seconds as a float
        "timeout_keep_alive": limits.keep_alive_s,
    }


def guarded_http(limits: LimitSettings, metrics: Metrics) -> type[GuardedHttpProtocol]:
    """``GuardedHttpProtocol`` with ``limits``, counting what it refuses in ``metrics``."""
    from service.api.errors import error_response

    def raw(status: int, reason: str, code: str, message: str) -> bytes:
        body = error_response(status, code, message).body
        head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        return f"{head}content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + bytes(body)

    late = metrics.http_rejected.labels("header_timeout")
    large = metrics.http_rejected.labels("header_size")

    class Guarded(GuardedHttpProtocol):
        head_timeout_s = limits.header_timeout_s
        max_head_bytes = limits.max_header_bytes
        head_timeout_answer = raw(
            408,
            "Request Timeout",
            "request_timeout",
            f"the request's headers did not arrive within {limits.header_timeout_s:g} s "
            "(FERRY_LIMITS__HEADER_TIMEOUT_S); the connection is closed",
        )
        head_too_large_answer = raw(
            431,
            "Request Header Fields Too Large",
            "request_header_fields_too_large",
            f"the request line and headers are larger than {limits.max_header_bytes} bytes "
            "(FERRY_LIMITS__MAX_HEADER_BYTES); the connection is closed",
        )
        on_head_timeout = late.inc
        on_head_too_large = large.inc

    return Guarded


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol (the one uvicorn picks when httptools is installed, as
    ``uvicorn[standard]`` installs it) with the bounds uvicorn lacks on a connection:

    - **Headers in time**: a connection has ``head_timeout_s`` to deliver a request's line and headers,
      counted from its opening (a connection that sends nothing is closed too) or, on a kept-alive
      connection, from the next request's first byte. Then it gets a 408 and is closed, or is just
      closed when nothing of a request arrived. uvicorn's own keep-alive timeout only covers the idle
      time between requests, and its first byte cancels it: a client that then holds partial headers
      (slowloris) would keep the connection, and what it sent, forever.
    - **Headers of bounded size**: more than ``max_head_bytes`` received before the headers end gets a
      431 and the connection is closed (httptools and uvicorn keep the headers in memory, unbounded).
    - **An answer before the body closes the connection**: until a request's whole body has arrived, its
      answer (413, 401, the concurrency cap's 503, the body timeout's 408) is sent with ``Connection:
      close`` and the connection is closed after it, instead of the server reading, and throwing away,
      whatever rest of the body the client keeps sending at its own pace.

    The body's own deadline is the app's (``FastPath``: 408 after ``FERRY_LIMITS__BODY_TIMEOUT_S``). While
    the app answers a request the connection is bounded by the app; between requests by uvicorn's
    keep-alive timeout. The subclass made by ``guarded_http`` sets the class attributes.
    """

    head_timeout_s: ClassVar[float] = 10.0
    max_head_bytes: ClassVar[int] = 64 * 1024
    head_timeout_answer: ClassVar[bytes] = b""
    head_too_large_answer: ClassVar[bytes] = b""
    draining: ClassVar[bool] = False
    """Set by the first SIGTERM (``GracefulServer``): every answer says ``Connection: close`` and closes
    its connection, so clients holding kept-alive connections reconnect (elsewhere, once readiness has
    taken this server out) during the grace period, instead of sending a request on a connection the
    drain then closes unread."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One timer per connection, re-armed only when it fires: arming and cancelling one per request
        # cost about 4 us of the HTTP floor's 100. It fires at or before the deadline of the head
        # being read, and checks ``_head_started`` then.
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started: float | None = None  # when the head being read began; None: none is
        self._reading_head = True  # until a request's headers are complete, and again after its body
        self._head_bytes = 0  # received while reading a head (at most one read more than counted)
        self._head_tail = b""  # the last bytes of the head read so far: its end may span two reads
        self._shutting_down = False

    def on_head_timeout(self) -> None:
        """Called once per connection closed for its headers' time (a metric, in ``guarded_http``)."""

    def on_head_too_large(self) -> None:
        """Called once per connection closed for its headers' size."""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_begins()  # a new connection must send a request in time, or anything at all

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            if self._head_started is None:
                self._head_begins()
            # Measured before the parser sees the bytes: a head that arrives whole in one read is
            # complete (and its request served) by the time the parser returns. The head ends at the
            # first blank line, looked for across the previous read's last 3 bytes too.
            seen = self._head_tail + data
            end = seen.find(b"\r\n\r\n")
            head = self._head_bytes + (len(data) if end < 0 else end + 4 - len(self._head_tail))
            self._head_bytes += len(data)
            self._head_tail = seen[-3:]
            if head > self.max_head_bytes and not self.transport.is_closing():
                self.on_head_too_large()
                self._close(self.head_too_large_answer)
                return
        super().data_received(data)

    def shutdown(self) -> None:
        self._shutting_down = True
        super().shutdown()

    # httptools parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = max(self._head_bytes, 1)  # part of a request arrived: a timeout answers 408
        if self._head_started is None:  # a request that began in the same read as the last one ended
            self._head_begins()

    def on_headers_complete(self) -> None:
        self._reading_head, self._head_started = False, None
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous and self.draining:
            cycle.keep_alive = False
        elif cycle is not previous and cycle.keep_alive:
            # Until the body is complete, an answer closes the connection (see the class docstring).
            cycle.keep_alive = False
            cycle.ferry_keep_alive = True  # type: ignore[attr-defined]

    def on_message_complete(self) -> None:
        cycle = self.cycle
        super().on_message_complete()
        if (
            cycle is not None
            and getattr(cycle, "ferry_keep_alive", False)
            and not cycle.response_started
            and not self._shutting_down
        ):
            cycle.keep_alive = True  # the whole body arrived before the answer: keep-alive as asked
        self._reading_head, self._head_bytes, self._head_tail = (
            True,
            0,
            b"",
        )  # the next head's time starts at its first byte

    # the head timer
    def _head_begins(self) -> None:
        self._head_started = self.loop.time()
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_started + self.head_timeout_s, self._check_head)

    def _check_head(self) -> None:
        self._head_timer = None
        started = self._head_started
        if started is None or self.transport.is_closing():
            return  # no head being read: the next one arms the timer again
        now, deadline = self.loop.time(), started + self.head_timeout_s
        if now < deadline:  # armed for an earlier head; this one has time left
            self._head_timer = self.loop.call_at(deadline, self._check_head)
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            self._head_begins()  # a pipelined head waits while the request before it is answered
            return
        self.on_head_timeout()
        self._close(self.head_timeout_answer if self._head_bytes else b"")

    def _close(self, answer: bytes) -> None:
        if answer:
            self.transport.write(answer)
        self.transport.close()
