"""``loadtests/procs.py``, the process harness of the tests, the benchmark and the load tests: waiting for
readiness stops at once when Ferry says a model failed to load (instead of polling a server that cannot
become ready for its whole start-up timeout) or when the process exits, and says why with the log's tail;
stopping is SIGTERM, then SIGKILL; a throw-away redis-server starts, pauses, resumes and stops."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import procs  # loadtests/, on sys.path through conftest
import pytest

from conftest import RedisServer, Server, start_server, stop_server


class Readiness(BaseHTTPRequestHandler):
    answer: tuple[int, dict[str, object]] = (503, {})
    requests = 0

    def do_GET(self) -> None:
        Readiness.requests += 1
        status, body = self.answer
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[procs.Server]:
    http = ThreadingHTTPServer(("127.0.0.1", 0), Readiness)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    log = tmp_path / "server.log"
    log.write_text("model m not loaded: MLflow has no model version for 'models:/m@champion'\n")
    yield procs.Server("ferry", f"http://127.0.0.1:{http.server_address[1]}", sleeper, log)
    sleeper.kill()
    sleeper.wait()
    http.shutdown()


def test_a_model_that_failed_to_load_ends_the_wait_with_the_servers_log(server: procs.Server) -> None:
    Readiness.answer = (503, {"status": "not_ready", "models": {"m": "failed", "n": "ready"}})
    Readiness.requests = 0
    with pytest.raises(RuntimeError, match=r"model\(s\) m failed to load") as info:
        procs.wait_ready(server, "/health/ready", timeout_s=60)
    assert "no model version" in str(info.value)  # the log tail says why
    assert Readiness.requests == 1  # the first answer ended it: no polling until the timeout


def test_a_model_still_loading_is_waited_for(server: procs.Server) -> None:
    Readiness.answer = (503, {"status": "not_ready", "models": {"m": "loading"}})
    with pytest.raises(RuntimeError, match="not ready within"):
        procs.wait_ready(server, "/health/ready", timeout_s=0.6)
    Readiness.answer = (200, {"status": "ready"})
    procs.wait_ready(server, "/health/ready", timeout_s=10)


def test_readiness_through_another_url_and_the_demo_hint(server: procs.Server) -> None:
    Readiness.answer = (503, {"status": "not_ready", "models": {"m": "failed"}})
    with pytest.raises(RuntimeError, match=r"make register-demo"):
        procs.wait_ready(server, "/health/ready", timeout_s=5, url=server.url, hint=procs.DEMO_HINT)


def _python(tmp_path: Path, code: str) -> procs.Server:
    return procs.launch(
        "child", [sys.executable, "-c", code], tmp_path / "child.log", url="http://127.0.0.1:9"
    )


def test_a_process_that_exits_ends_the_wait_with_its_status_and_log(tmp_path: Path) -> None:
    child = _python(tmp_path, "print('cannot bind: boom', flush=True); raise SystemExit(3)")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="child exited with 3") as info:
        procs.wait_ready(child, "/health/ready", timeout_s=60)
    assert "cannot bind: boom" in str(info.value)
    assert time.monotonic() - started < 30


def test_stop_is_sigterm_then_sigkill_for_the_whole_group(tmp_path: Path) -> None:
    polite = _python(tmp_path, "import time; print('up', flush=True); time.sleep(60)")
    assert procs.wait_until(lambda: "up" in polite.log(), timeout_s=30)
    assert procs.stop_server(polite) == -signal.SIGTERM
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); "
        "time.sleep(60)"
    )
    stubborn = _python(tmp_path, code)
    assert procs.wait_until(lambda: "up" in stubborn.log(), timeout_s=30)
    started = time.monotonic()
    assert procs.stop_server(stubborn, timeout_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 15
    assert not procs._group_pids(stubborn.process.pid), "the child outlived the stop"


def test_conftest_reexports_the_harness() -> None:
    assert Server is procs.Server and RedisServer is procs.RedisServer and stop_server is procs.stop_server
    assert start_server.__module__ == "conftest"


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_server_starts_pauses_resumes_and_stops(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        assert redis.client().ping()
        redis.pause()
        with socket.create_connection(("127.0.0.1", redis.port), timeout=0.3) as conn:
            conn.sendall(b"PING\r\n")
            with pytest.raises(TimeoutError):
                conn.recv(64)  # the kernel accepted the connection; the stopped server never answers
        redis.resume()
        assert redis.client().ping()
    finally:
        redis.stop()
    assert redis.process is not None and redis.process.poll() is not None


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="redis-server exited") as info:
        RedisServer(tmp_path, "--no-such-option", "1").start()
    assert "no-such-option" in str(info.value)
