"""``FERRY_WORKERS`` > 1: a supervisor process and N serving processes (workers) on one port.

The supervisor binds the listening socket (and ``FERRY_METRICS_PORT``'s) once and every worker inherits
it: the kernel hands each new connection to whichever worker accepts first. One shared socket rather
than ``SO_REUSEPORT`` per worker: port 0 works (the supervisor learns the port before any worker
starts), a dead worker's queued connections stay in the shared queue for the others (with
``SO_REUSEPORT`` the kernel hashes connections to a socket, and those queued on a dead one are reset),
and no other process can join the port group. A connection stays on the worker that accepted it.

Workers are fresh interpreters (``python -m service serve`` with the sockets in ``SOCKETS_ENV``:
spawned, never forked from a process that imported torch or CUDA), each a whole Ferry app: its own
models, batchers and memory cache tiers; Redis is shared. The supervisor imports no framework. It
restarts a worker that dies, after an exponential backoff (``ferry_worker_restarts_total``, one log line
with the exit status or signal). Only worker 0 accepts connections while it loads (so that
``/health/live`` answers and ``/health/ready`` says 503 at once, as with one process); every other
worker, and any restarted one, accepts only once its models are loaded, so clients never meet a cold
worker behind a ready probe. SIGTERM or SIGINT is forwarded once to every worker, each runs
its own grace period and drain (``GracefulServer``), and the supervisor exits 0 when they all did. A
worker that cannot start (exit 2 or 3: bad settings, a failed start-up) stops the whole server with
status 1 instead of being restarted forever.

Model versions: each worker also gets one end of a socket pair to the supervisor, whose loop waits on
them (``selectors``) and runs coordinated swaps over them (``swaps.py``: ``Coordinator``): only worker 0
follows the aliases, and every change of a served version lands on all workers together or on none.

Metrics: ``PROMETHEUS_MULTIPROC_DIR`` is a fresh folder the supervisor creates and removes; every
worker writes its values there and ``/metrics`` on any worker reads them all (``Metrics.exposition``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from service.swaps import CHANNEL_ENV, INDEX_ENV, Coordinator, encode

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger("ferry")

SOCKETS_ENV = "_FERRY_WORKER_SOCKETS"
"""Internal (set by the supervisor for its workers): the inherited file descriptors, ``main[,ops]``."""
HOLD_ENV = "_FERRY_WORKER_HOLD"
"""Internal: ``1`` for a worker that accepts connections only once its models are loaded (all but
worker 0's first start)."""
BOOT_FAILED = 3
"""A worker's exit status when it could not start: the supervisor stops instead of restarting it."""
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_S = 60.0
"""A worker that ran this long before dying restarts after the first backoff again."""
POLL_S = 0.05


def worker_count(settings: Settings) -> tuple[int, list[str]]:
    """How many workers, and the device of each (``FERRY_DEVICE`` as given, or ``cuda:I`` one per GPU
    when ``FERRY_WORKERS=auto`` on CUDA). ``auto``: one per usable CPU core on CPU (``usable_cores``),
    one per GPU on CUDA."""
    device = settings.device
    gpus = 0
    if device != "cpu":
        try:
            from service.runtime.torch import cuda_device_count

            gpus = cuda_device_count()
        except ImportError:  # no torch: no CUDA
            gpus = 0
    cuda = gpus > 0 and device in ("auto", "cuda")
    if settings.workers != "auto":
        return settings.workers, [device] * settings.workers
    if cuda:
        return gpus, [f"cuda:{i}" for i in range(gpus)]
    if device.startswith("cuda:"):
        return 1, [device]
    cores = usable_cores()
    return cores, [device] * cores


def usable_cores(cgroup: str = "/sys/fs/cgroup") -> int:
    """The CPU cores this process may use: the CPUs it may run on (``sched_getaffinity``), fewer when a
    cgroup CPU quota (a container's CPU limit: cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``) allows less, rounded up; at least 1."""
    cores = len(os.sched_getaffinity(0))
    quota: float | None = None
    with contextlib.suppress(OSError, ValueError):
        limit, period = Path(cgroup, "cpu.max").read_text().split()[:2]
        if limit != "max":
            quota = int(limit) / int(period)
    if quota is None:
        with contextlib.suppress(OSError, ValueError):
            limit = Path(cgroup, "cpu", "cpu.cfs_quota_us").read_text().strip()
            period = Path(cgroup, "cpu", "cpu.cfs_period_us").read_text().strip()
            if int(limit) > 0:
                quota = int(limit) / int(period)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` is), inheritable by the workers."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)  # uvicorn's default backlog
    sock.set_inheritable(True)
    return sock


@dataclass
class _Worker:
    index: int
    device: str
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive short lives: the backoff's exponent
    due: float = 0.0  # when a dead worker is started again
    exit_status: int | None = None
    channel: socket.socket | None = None  # the supervisor's end of the worker's socket pair (swaps.py)
    received: bytes = b""  # a message not yet complete


@dataclass
class Supervisor:
    """Runs ``count`` workers on ``sockets`` until a signal asks it to drain them."""

    settings: Settings
    env: dict[str, str]
    devices: list[str]
    sockets: list[socket.socket]
    metrics_dir: str
    workers: list[_Worker] = field(default_factory=list)
    stopping: int = 0  # signals received
    restarts: Any = None  # the ferry_worker_restarts_total counter
    coordinator: Coordinator = field(default_factory=Coordinator)
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)

    def run(self) -> int:
        from service.metrics import Metrics

        metrics = Metrics(process=False)
        self.restarts, self.coordinator.metrics = metrics.worker_restarts, metrics
        self.workers = [_Worker(i, device) for i, device in enumerate(self.devices)]
        for worker in self.workers:
            self._start(worker, restart=False)
        previous = {sig: signal.signal(sig, self._signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        drain_deadline: float | None = None
        while True:
            now = time.monotonic()
            for worker in self.workers:
                process = worker.process
                if process is not None and (status := process.poll()) is not None:
                    worker.process, worker.exit_status = None, status
                    self._exited(worker, process.pid, status, now)
                    if status in (2, BOOT_FAILED) and not self.stopping:
                        log.error(
                            "worker %d could not start (exit %d): stopping every worker", worker.index, status
                        )
                        self._forward(signal.SIGTERM)
                        self.stopping = max(self.stopping, 1)
                        self._wait_all(self.settings.shutdown.grace_s * 3 + 30)
                        return 1
                if worker.process is None and not self.stopping and now >= worker.due:
                    self._start(worker, restart=True)
            if self.stopping:
                if self.sockets:
                    # The workers' copies keep the port open through their grace period; once the last
                    # worker closes its copy, new connections are refused, not queued for no one.
                    for sock in self.sockets:
                        sock.close()
                    self.sockets = []
                if drain_deadline is None:
                    # each worker: its grace period, then uvicorn's own bound (2x grace) and the drain
                    drain_deadline = now + self.settings.shutdown.grace_s * 3 + 30.0
                if all(w.process is None for w in self.workers):
                    failed = [w.index for w in self.workers if w.exit_status not in (0, None)]
                    if failed:
                        log.error("worker(s) %s did not exit cleanly", failed)
                    return 1 if failed else 0
                if now > drain_deadline:
                    log.error("workers still running after the drain deadline: killing them")
                    self._forward(signal.SIGKILL)
                    drain_deadline = now + 3600.0
            self._pump(POLL_S)

    def _pump(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for messages from the workers' channels and act on them (``swaps.py``)."""
        for key, _ in self.selector.select(timeout_s):
            worker: _Worker = key.data
            sock = worker.channel
            if sock is None:
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self._disconnect(worker)
                continue
            *lines, worker.received = (worker.received + data).split(b"\n")
            for line in lines:
                try:
                    self.coordinator.received(worker.index, json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("worker %d sent a message the supervisor cannot read (%r): %r",
                              worker.index, exc, line[:200])  # fmt: skip
        self.coordinator.tick()
        for index, message in self.coordinator.take():
            target = self.workers[index]
            if target.channel is None:
                continue
            try:
                target.channel.sendall(encode(message))
            except OSError as exc:
                log.error("worker %d: its channel failed (%r)", index, exc)
                self._disconnect(target)

    def _disconnect(self, worker: _Worker) -> None:
        if worker.channel is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(worker.channel)
        worker.channel.close()
        worker.channel, worker.received = None, b""
        self.coordinator.left(worker.index)

    def _start(self, worker: _Worker, *, restart: bool) -> None:
        self._disconnect(worker)
        mine, theirs = socket.socketpair()
        fds = [s.fileno() for s in self.sockets]
        env = self.env | {
            CHANNEL_ENV: str(theirs.fileno()),
            INDEX_ENV: str(worker.index),
            SOCKETS_ENV: ",".join(map(str, fds)),
            HOLD_ENV: "1" if restart or worker.index > 0 else "0",
            "FERRY_DEVICE": worker.device,
            "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
        }
        try:
            worker.process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],  # a worker: it finds SOCKETS_ENV
                env=env,
                pass_fds=[*fds, theirs.fileno()],
                process_group=0,  # a terminal's Ctrl-C reaches the supervisor only; it forwards one signal
            )
        finally:
            theirs.close()
        mine.settimeout(5.0)  # a send to a worker whose loop is stuck fails instead of stopping all
        worker.channel = mine
        self.selector.register(mine, selectors.EVENT_READ, worker)
        worker.started, worker.exit_status = time.monotonic(), None
        log.info("worker %d started (pid %d, %s)", worker.index, worker.process.pid, worker.device)

    def _exited(self, worker: _Worker, pid: int, status: int, now: float) -> None:
        from prometheus_client import multiprocess

        self._disconnect(worker)
        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call] # its live gauges leave the view
        how = f"signal {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
        if self.stopping:
            log.info("worker %d (pid %d) stopped: %s", worker.index, pid, how)
            return
        worker.failures = 0 if now - worker.started >= STABLE_S else worker.failures + 1
        backoff = min(FIRST_BACKOFF_S * 2 ** max(worker.failures - 1, 0), MAX_BACKOFF_S)
        worker.due, worker.restarts = now + backoff, worker.restarts + 1
        self.restarts.inc()
        log.warning(
            "worker %d (pid %d) died (%s) after %.1fs: restarting in %.1fs",
            worker.index, pid, how, now - worker.started, backoff,
        )  # fmt: skip

    def _signal(self, sig: int, frame: FrameType | None) -> None:
        for worker in self.workers:
            if worker.process is None:  # died before the drain, waiting for its restart: not the drain's
                worker.exit_status = None
        self.stopping += 1
        log.info("signal %d: draining %d worker(s)", sig, len(self.workers))
        self._forward(signal.SIGTERM)  # a second signal is forwarded too: workers skip their grace

    def _forward(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    def _wait_all(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.wait(max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()


def supervise(settings: Settings, env: dict[str, str]) -> int:
    """Serve with ``FERRY_WORKERS`` > 1 (``env``: the environment of the workers, overrides included)."""
    count, devices = worker_count(settings)
    try:
        sockets = [listen(settings.host, settings.port)]
        if settings.metrics_port is not None:
            sockets.append(listen(settings.host, settings.metrics_port))
    except OSError as exc:
        print(f"ferry: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    port = sockets[0].getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="ferry-metrics-")
    # The supervisor's own counter (restarts) goes to the same folder: set before any metric exists.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call] # in case prometheus_client was imported already
    log.info(
        "serving on http://%s:%d with %d workers (supervisor pid %d)", settings.host, port, count, os.getpid()
    )
    try:
        return Supervisor(settings, env | {"FERRY_PORT": str(port)}, devices, sockets, metrics_dir).run()
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("supervisor exiting")


def _die_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies (even by SIGKILL): no orphan keeps the port."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the supervisor died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def hold_until_loaded(app: Any, stopping: Callable[[], bool]) -> None:
    """Make ``app``'s start-up wait until no model is still loading (loaded or failed), so that its
    server accepts connections only then (another worker serves meanwhile, or will)."""
    import asyncio

    from service.lifecycle import ModelState

    inner = app.router.lifespan_context
    app.state.grpc_after_load = True  # its gRPC port (FERRY_GRPC_PORT, shared) opens with the HTTP one

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as state:
            models = app.state.pipeline.models

            # slots have no event for it: polled, 20 times a second, only while a restart loads
            def loading() -> bool:
                return not stopping() and any(s.state == ModelState.LOADING for s in models.slots())

            while loading():  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            grpc_server = getattr(app.state, "grpc_server", None)
            if grpc_server is not None and not stopping():
                await grpc_server.start()
            yield state

    app.router.lifespan_context = lifespan


def inherited_sockets() -> list[socket.socket] | None:
    """In a worker the supervisor started: the sockets it passed (main, then ``FERRY_METRICS_PORT``'s),
    after arranging to be stopped when the supervisor dies; elsewhere ``None``."""
    fds = os.environ.get(SOCKETS_ENV)
    if not fds:
        return None
    _die_with_parent()
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",")]


def holds() -> bool:
    """Whether this worker accepts connections only once its models are loaded (``HOLD_ENV``)."""
    return os.environ.get(HOLD_ENV) == "1"
