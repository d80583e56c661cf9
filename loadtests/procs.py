"""Processes for the tests, the benchmark and the load tests: one owner of free ports, starting a server
with its log file, polling until it is ready, stopping it, and a throw-away ``redis-server``.

Every server runs in a new session, so stopping it stops what it started too (``mlflow models serve``
runs uvicorn as a child). Nothing here waits without a deadline, and every failure to start says why:
the process exited (with its status) or time ran out, with the tail of its log.

``tests/conftest.py`` puts this folder on ``sys.path`` and re-exports what the tests use; the scripts
here import it as ``procs`` (they run as plain scripts: ``python loadtests/bench.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: Ferry and MLflow run from here so that ``.ferry/`` is the registry they share."""
_CLK_TCK = os.sysconf("SC_CLK_TCK")
LOG_TAIL = 4000
"""Characters of a server's log quoted when it fails to start."""
DEMO_HINT = "is the registry populated? `make register-demo`"
"""What ``start_server`` adds when a model of the benchmark's or load test's servers failed to load."""
_MODELS_FAILED = "reports model(s)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A server process (and its children), its base URL and its log file."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self, tail: int | None = None) -> str:
        """The log so far (its last ``tail`` characters when given); empty when there is none."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-tail:] if tail else text

    def cpu_seconds(self) -> float:
        """User + system CPU of the server's live processes (seconds): its process group, and its
        descendants in groups of their own (Ferry's workers: ``FERRY_WORKERS`` > 1)."""
        group = set(_group_pids(self.process.pid))
        return group_cpu_seconds(self.process.pid) + sum(
            process_cpu_seconds(pid) for pid in _descendants(self.process.pid) if pid not in group
        )


def venv_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment with this interpreter's ``bin`` first on ``PATH`` (``mlflow models
    serve`` runs ``uvicorn`` by name), plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env |= extra or {}
    return env


def launch(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    url: str = "",
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> Server:
    """Start ``argv`` in a new session, stdout and stderr to ``log_path``; does not wait for anything."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else venv_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name=name, url=url, process=process, log_path=log_path)


def start_server(
    name: str,
    argv: Sequence[str],
    port: int,
    ready_path: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 180.0,
    hint: str = DEMO_HINT,
) -> Server:
    """Start ``argv`` (serving ``http://127.0.0.1:port``) from the repository root and wait until
    ``GET ready_path`` answers 200 (or fail, having stopped it); ``hint`` is added when a model failed
    to load."""
    log_path = log_dir / f"{name}-{port}.log"
    server = launch(name, argv, log_path, url=f"http://127.0.0.1:{port}", env=env)
    try:
        wait_ready(server, ready_path, timeout_s, hint=hint)
    except BaseException:
        stop_server(server)
        raise
    return server


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.001) -> bool:
    """Poll ``condition`` until it holds (``True``) or ``timeout_s`` passes (``False``)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


class _Failed(Exception):
    """A readiness check saw the server will not get ready (its message says why)."""


def poll_until(
    process: subprocess.Popen[bytes], ready: Callable[[], bool], timeout_s: float, interval_s: float = 0.2
) -> str | None:
    """Call ``ready()`` until it is true: ``None`` then, else why not: the process exited, ``ready``
    raised ``_Failed``, or ``timeout_s`` ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            return f"exited with {process.returncode}"
        try:
            if ready():
                return None
        except _Failed as failed:
            return str(failed)
        if time.monotonic() >= deadline:
            return f"not ready within {timeout_s:g}s"
        time.sleep(interval_s)


def poll_ready(
    process: subprocess.Popen[bytes], url: str, timeout_s: float, interval_s: float = 0.2
) -> str | None:
    """GET ``url`` until it answers 200: ``None`` then, else why not (see ``poll_until``). A Ferry
    readiness answer naming a model that failed to load ends the wait at once: Ferry would only retry at
    its next registry poll, minutes later."""

    def answered_200() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback)
                return bool(response.status == 200)
        except urllib.error.HTTPError as error:
            failed = _failed_models(error.read())
            if failed:
                raise _Failed(f"{_MODELS_FAILED} {', '.join(failed)} failed to load") from None
        except OSError:
            pass
        return False

    return poll_until(process, answered_200, timeout_s, interval_s)


def wait_ready(server: Server, path: str, timeout_s: float, url: str | None = None, hint: str = "") -> None:
    """Until ``GET path`` (on ``url`` instead of the server's own, when given) answers 200; else a
    ``RuntimeError`` saying why (``hint`` added when a model failed to load), with the tail of the
    server's log. Does not stop the server."""
    failure = poll_ready(server.process, f"{url or server.url}{path}", timeout_s)
    if failure is None:
        return
    if hint and failure.startswith(_MODELS_FAILED):
        failure += f" ({hint})"
    raise RuntimeError(f"{server.name} {failure}:\n{server.log(LOG_TAIL)}")


def _failed_models(body: bytes) -> list[str]:
    """Models a Ferry readiness body (``{"models": {name: state}}``) reports as failed."""
    try:
        models = json.loads(body)["models"]
        return sorted(name for name, state in models.items() if state == "failed")
    except (ValueError, TypeError, KeyError, AttributeError):  # not a Ferry readiness body
        return []


def stop_server(server: Server, timeout_s: float = 30.0) -> int:
    """SIGTERM the server's process group, SIGKILL it after ``timeout_s``; the exit status."""
    pgid = server.process.pid
    if server.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            server.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            server.process.wait(timeout=10)
    # Children that outlived their parent (uvicorn under ``mlflow models serve``) share its group.
    deadline = time.monotonic() + 10
    while _group_pids(pgid) and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.1)
    return server.process.returncode


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        stop_server(server)


class RedisServer:
    """One ``redis-server`` on 127.0.0.1 and a unix socket in ``workdir``, without persistence, logging to
    ``workdir/redis-<port>.log``. ``extra``: more ``redis-server`` arguments."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.workdir, self.extra = workdir, extra
        self.port = free_port()
        self.socket = workdir / "redis.sock"
        self.server: Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.server.process if self.server is not None else None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it (again, on the same port and socket) and wait until it answers PING."""
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700", "--dir", str(self.workdir)]
        log_path = self.workdir / f"redis-{self.port}.log"
        self.server = launch("redis-server", ["redis-server", *args, *self.extra], log_path, cwd=self.workdir)
        failure = poll_until(self.server.process, self._answers, timeout_s, interval_s=0.02)
        if failure is not None:
            self.kill()
            raise RuntimeError(f"redis-server {failure}:\n{self.server.log(LOG_TAIL)}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.server is not None:
            stop_server(self.server, timeout_s=10)

    def kill(self) -> None:
        """SIGKILL at once (works on a paused server too)."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self, **kwargs: object) -> redis.Redis:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state is field 0, ppid 1, pgrp 2, utime 11, stime 12."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def group_cpu_seconds(pgid: int) -> float:
    return sum(process_cpu_seconds(pid) for pid in _group_pids(pgid))


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants: the server's CPU even when ``pid`` is a wrapper
    (``timeout``, a shell) that started it."""
    return sum(process_cpu_seconds(p) for p in [pid, *_descendants(pid)])


def _descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (children, their children...)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo, seen = list(children.get(pid, [])), {pid}
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            found.append(current)
            todo += children.get(current, [])
    return found


def http_post(
    url: str, body: bytes, headers: Mapping[str, str] | None = None, timeout_s: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    """One POST (JSON unless ``headers`` say otherwise): status, headers (lower-case names), body; HTTP
    errors are answers, not raises."""
    request = urllib.request.Request(  # noqa: S310 (loopback)
        url, data=body, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()
