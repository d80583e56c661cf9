"""A client that hangs up while its request waits in the queue costs the model nothing: a real uvicorn
process, a model held busy by a gate, a second client that sends its rows and closes the connection.
Its rows must never reach the model, the drop is counted, and the server keeps answering."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import Registry, Server, metric, register_code_model, start_server, stop_server, wait_until

pytestmark = pytest.mark.integration

X = np.zeros((2, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def gated_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    register_code_model(
        registry, "gated", Path(__file__).with_name("gated_model.py"), X, {"gate": "", "log": ""}
    )
    # The cache stays on (the default): hung-up requests go through its single-flight path.
    server = start_server(registry, "gated=models:/gated@champion", tmp_path_factory.mktemp("gated"))
    yield server
    stop_server(server)


def until(condition: Callable[[], bool], what: str) -> None:
    assert wait_until(condition, timeout_s=30, interval_s=0.02), f"timed out waiting for {what}"


def metrics(server: Server, name: str, **labels: str) -> float:
    return metric(httpx.get(f"{server.url}/metrics", timeout=10).text, name, **labels)


def test_rows_of_a_client_that_hung_up_never_reach_the_model(gated_server: Server, tmp_path: Path) -> None:
    gate, log = tmp_path / "gate", tmp_path / "calls"
    params = {"gate": str(gate), "log": str(log)}

    def body(rows: int) -> bytes:
        return json.dumps({"inputs": np.full((rows, 3), rows).tolist(), "params": params}).encode()

    before = metrics(gated_server, "ferry_requests_rejected_total", model="gated", reason="client_gone")
    # A: two rows; the model takes them and waits at the gate.
    first: dict[str, httpx.Response] = {}
    holder = threading.Thread(
        target=lambda: first.update(r=httpx.post(f"{gated_server.url}/predict", content=body(2), timeout=60))
    )
    holder.start()
    until(lambda: log.exists() and log.read_text() == "2\n", "the model to take the first request")
    # B: three rows, queued behind A; then B hangs up.
    host, port = gated_server.url.removeprefix("http://").split(":")
    payload = body(3)
    with socket.create_connection((host, int(port)), timeout=10) as hangs_up:
        hangs_up.sendall(
            b"POST /predict HTTP/1.1\r\nHost: ferry\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        until(
            lambda: metrics(gated_server, "ferry_queue_rows", model="gated") == 3,
            "the second request to queue",
        )
    # The server has seen the hang-up once it answers anything that came after it.
    assert httpx.get(f"{gated_server.url}/health/live", timeout=10).status_code == 200
    gate.touch()
    holder.join(60)
    assert first["r"].status_code == 200 and first["r"].json()["outputs"] == np.full((2, 3), 2).tolist()
    # Its handler ends with a 499 in the HTTP metrics (nobody reads it), after the drop was counted.
    until(
        lambda: metrics(gated_server, "http_requests_total", handler="/predict", status="499") == 1,
        "the hung-up request to finish",
    )
    dropped = metrics(gated_server, "ferry_requests_rejected_total", model="gated", reason="client_gone")
    assert dropped == before + 1
    # The model ran A only; the server keeps answering, with the next request's own rows.
    r = httpx.post(f"{gated_server.url}/predict", content=body(4), timeout=60)
    assert r.status_code == 200 and r.json()["outputs"] == np.full((4, 3), 4).tolist()
    assert log.read_text().split() == ["2", "4"]
