"""Processes for the benchmark and the load tests: start a server in its own process group on a free
127.0.0.1 port, wait until it answers, read its CPU time, and stop the whole group.

Every server runs in a new session, so stopping it stops what it started too (``mlflow models serve``
runs uvicorn as a child). Nothing here waits without a deadline.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: Ferry and MLflow run from here so that ``.ferry/`` is the registry they share."""
_CLK_TCK = os.sysconf("SC_CLK_TCK")


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

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process in the server's process group (seconds)."""
        return group_cpu_seconds(self.process.pid)


def venv_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The current environment with this interpreter's ``bin`` first on ``PATH`` (``mlflow models
    serve`` runs ``uvicorn`` by name), plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env |= extra or {}
    return env


def start_server(
    name: str,
    argv: Sequence[str],
    port: int,
    ready_path: str,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 180.0,
) -> Server:
    """Start ``argv`` in a new session and wait until ``GET ready_path`` answers 200 (or fail, having
    stopped it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=dict(env) if env is not None else venv_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(name=name, url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        wait_ready(server, ready_path, timeout_s)
    except BaseException:
        stop_server(server)
        raise
    return server


def wait_ready(server: Server, path: str, timeout_s: float) -> None:
    """Until ``GET path`` answers 200. Fails at once when the server exits, or when Ferry's readiness
    says a model failed to load (it would only retry on its next registry poll, minutes later)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=2) as response:  # noqa: S310 (loopback)
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            failed = _failed_models(error.read())
            if failed:
                raise RuntimeError(
                    f"{server.name}: model(s) {', '.join(failed)} failed to load (is the registry "
                    f"populated? `make register-demo`):\n{server.log()}"
                ) from None
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{server.name} not ready within {timeout_s:.0f}s:\n{server.log()}")


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
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo, seen = 0.0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        total += process_cpu_seconds(current)
        todo += children.get(current, [])
    return total


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
