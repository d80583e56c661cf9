"""``loadtests/procs.wait_ready``: the benchmark stops waiting at once when Ferry says a model failed to
load, instead of polling a server that cannot become ready for its whole start-up timeout."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "loadtests"))
import procs


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
