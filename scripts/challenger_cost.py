#!/usr/bin/env python3
"""What challenger traffic costs the clients: one real Ferry at a time serving the tests' ``linear``
(a torch layer: v1 under ``@champion``, v2 under ``@challenger``, from the tests' registry built in a
temporary folder) with ``FERRY_CHALLENGER__MODE`` off, shadow at share 1 and canary at share 0.5, in
turn and each twice; 8 client threads with keep-alive connections, N requests each, distinct inputs and
the cache off (every request reaches the model). Prints requests per second, client-side p50 and p99,
and for shadow how many rows were compared and how many shadow calls were dropped. Run with the venv's
Python from the repository root (N defaults to 400):

    N=400 .venv/bin/python scripts/challenger_cost.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import build_registry, metric, start_server, stop_server

N, THREADS = int(os.environ.get("N", "400")), 8
RUNS = (("shadow", "1"), ("off", "0"), ("canary", "0.5")) * 2


def load(url: str) -> tuple[float, np.ndarray]:
    """Requests per second and every request's latency (ms) of THREADS clients sending N each."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(t: int) -> None:
        mine = []
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(N):
                body = {"inputs": [[float(t), float(i), 1.0, 2.0]]}
                started = time.perf_counter()
                r = c.post("/models/linear/predict", json=body, headers={"X-Request-Key": f"{t}-{i}"})
                mine.append(time.perf_counter() - started)
                r.raise_for_status()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(latencies) / (time.perf_counter() - started), np.array(latencies) * 1000


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="challenger-cost-"))
    registry = build_registry(root / "registry")
    for mode, share in RUNS:
        env = {
            "FERRY_CHALLENGER__MODE": mode,
            "FERRY_CHALLENGER__SHARE": share,
            "FERRY_RELOAD__POLL_S": "0",
            "FERRY_LOG_LEVEL": "warning",
            "FERRY_CACHE__ENABLED": "false",
        }
        server = start_server(
            registry, "linear=models:/linear@champion", Path(tempfile.mkdtemp(dir=root)), env
        )
        try:
            while (
                mode != "off"
                and metric(httpx.get(f"{server.url}/metrics").text, "ferry_challenger_ready") < 1
            ):
                time.sleep(0.1)  # readiness waits for the champion only
            rate, ms = load(server.url)
            time.sleep(1)  # the last shadow calls finish
            text = httpx.get(f"{server.url}/metrics").text
            line = (
                f"{mode:6s} share {share:3s}: {rate:6.1f} req/s, p50 {np.percentile(ms, 50):5.1f} ms, "
                f"p99 {np.percentile(ms, 99):5.1f} ms"
            )
            if mode == "shadow":
                line += (
                    f"; compared {metric(text, 'ferry_challenger_compared_rows_total'):.0f} rows, dropped "
                    f"{metric(text, 'ferry_challenger_shadow_dropped_total'):.0f}"
                )
            if mode == "canary":
                line += f"; answered by v2: {metric(text, 'ferry_inference_requests_total', version='2'):.0f}"
            print(line, flush=True)
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
