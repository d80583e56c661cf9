"""SIGTERM to a real uvicorn-served Ferry under continuous load: readiness turns 503 at once, accepted
requests all succeed through the grace period and the drain, and the process exits 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import Registry, fault_summary, start_server, wait_until

pytestmark = pytest.mark.integration


def test_sigterm_drains_without_dropping_accepted_requests(registry: Registry, tmp_path: Path) -> None:
    server = start_server(
        registry, "linear=models:/linear@champion", tmp_path, {"FERRY_SHUTDOWN__GRACE_S": "2"}
    )
    stop = threading.Event()
    statuses: list[int] = []
    refused: list[str] = []
    latencies: list[float] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    started = time.perf_counter()
                    r = http.post("/predict", json={"model": "linear", "inputs": [[i, 0, 0, 0]]})
                    latencies.append(time.perf_counter() - started)
                except httpx.ConnectError as exc:  # after the grace period: not accepted, not failed
                    refused.append(type(exc).__name__)
                    time.sleep(0.05)
                    continue
                statuses.append(r.status_code)
                assert r.status_code != 200 or r.json()["outputs"] == [[2 * i + 1.0] * 3]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(statuses) >= 8, timeout_s=30, interval_s=0.05)
        served_before = len(statuses)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{server.url}/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "shutting_down"
        during = len(statuses)
        time.sleep(1.0)
        assert len(statuses) > during, "requests stopped being served during the grace period"
        assert server.process.wait(timeout=30) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if server.process.poll() is None:
            server.process.kill()
    fault_summary("SIGTERM with 2 s grace, 8 clients (refused after close not counted)", statuses, latencies)
    assert served_before > 0
    assert statuses and set(statuses) == {200}, f"non-200 among accepted requests: {set(statuses)}"
    assert "readiness is now 503" in server.log()
