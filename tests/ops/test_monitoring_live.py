"""monitoring/ against a live Ferry: every metric the dashboards and rules read is one Ferry exports, and
a real Prometheus (Debian's package) scraping Ferry answers the dashboards' request-rate and p99 queries.

Uses the session's ``ferry_server`` fixture (tests/conftest.py), which serves ``tabular-mlp-onnx``.
"""

from __future__ import annotations

import math
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from conftest import poll_ready
from monitoring_support import (
    EXTERNAL_METRICS,
    HTTP_METRICS,
    dashboards,
    exposed_names,
    gpu_metric_names,
    recorded_names,
    require_tool,
    rule_files,
    substitute,
    used_metric_names,
)

pytestmark = pytest.mark.integration

MODEL = "tabular-mlp-onnx"
VARIABLES = {"job": "ferry", "instance": ".*", "__rate_interval": "10s"}
"""Dashboard variables as Grafana would fill them for this Prometheus (1 s scrapes)."""


class _Server(Protocol):
    url: str


def _predict(client: httpx.Client, i: int) -> int:
    """One single-row request with distinct inputs (so that the cache does not answer them all)."""
    row = [((i * 7 + j) % 97) / 97.0 for j in range(64)]
    return client.post("/predict", json={"model": MODEL, "inputs": [row]}).status_code


def _dashboard_expr(file: str, title: str, legend: str | None = None) -> str:
    (panel,) = [p for p in dashboards()[file]["panels"] if p.get("title") == title]
    (target,) = [t for t in panel["targets"] if legend is None or t["legendFormat"] == legend]
    return substitute(target["expr"], VARIABLES)


def test_every_metric_used_is_exported_by_a_live_ferry(ferry_server: _Server) -> None:
    with httpx.Client(base_url=ferry_server.url, timeout=10) as client:
        statuses = Counter(_predict(client, i) for i in range(20))
        assert statuses == {200: 20}, statuses
        scrape = client.get("/metrics")
    assert scrape.status_code == 200
    exported = exposed_names(scrape.text)
    missing_http = set(HTTP_METRICS) - exported
    assert not missing_http, f"HTTP-layer metrics the dashboards read are not exported: {missing_http}"
    # GPU gauges are exported only where NVML answers; their names come from service/gpu.py itself.
    known = exported | gpu_metric_names() | recorded_names() | set(EXTERNAL_METRICS)
    unknown = {name: sorted(where) for name, where in used_metric_names().items() if name not in known}
    assert not unknown, (
        f"used by dashboards or rules, exported by neither Ferry nor an allow-listed source: {unknown}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Traffic:
    """Sends requests from a thread until stopped; counts the statuses it got."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.statuses: Counter[int | str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> _Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            i = 0
            while not self._stop.is_set():
                try:
                    self.statuses[_predict(client, i)] += 1
                except httpx.HTTPError as exc:  # recorded, asserted on by the test
                    self.statuses[type(exc).__name__] += 1
                i += 1
                self._stop.wait(0.02)


def _query(api: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{api}/api/v1/query", params={"query": expr}, timeout=5)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _wait_for_value(api: str, expr: str, positive: bool = True, timeout_s: float = 60.0) -> float:
    """Poll an instant query until it returns one finite (and positive) sample; that sample's value."""
    deadline = time.monotonic() + timeout_s
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = _query(api, expr)
        value = float(result[0]["value"][1]) if len(result) == 1 else math.nan
        if math.isfinite(value) and (value > 0 or not positive):
            return value
        time.sleep(0.5)
    pytest.fail(f"no {'positive ' * positive}finite value within {timeout_s}s for {expr}: last {result}")


def _start_prometheus(ferry_url: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in rule_files()],
        "scrape_configs": [
            {"job_name": "ferry", "static_configs": [{"targets": [urlsplit(ferry_url).netloc]}]}
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                require_tool("prometheus"),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}", log_path


def _wait_ready(process: subprocess.Popen[bytes], api: str, log_path: Path, timeout_s: float = 30.0) -> None:
    failure = poll_ready(process, f"{api}/-/ready", timeout_s)
    if failure is not None:
        pytest.fail(f"prometheus {failure}:\n{log_path.read_text()}")


def test_prometheus_scrapes_ferry_and_answers_the_dashboard_queries(
    ferry_server: _Server, tmp_path: Path
) -> None:
    rate_expr = _dashboard_expr("overview.json", "Inference requests/s")
    p99_expr = _dashboard_expr("overview.json", "Inference latency (HTTP): p50, p95, p99", legend="p99")
    process, api, log_path = _start_prometheus(ferry_server.url, tmp_path)
    try:
        _wait_ready(process, api, log_path)
        with _Traffic(ferry_server.url) as traffic:
            assert _wait_for_value(api, 'up{job="ferry"}') == 1.0
            rate = _wait_for_value(api, rate_expr)
            p99 = _wait_for_value(api, p99_expr)
            # The rules load and evaluate on live data: no 5xx, so the error ratio is 0, not absent.
            ratio = _wait_for_value(
                api, 'job:ferry_http_inference_errors:ratio_rate5m{job="ferry"}', positive=False
            )
        assert traffic.statuses and set(traffic.statuses) == {200}, traffic.statuses
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert 1 <= rate < 10_000, rate
    assert 0 < p99 <= 30, p99  # seconds, within the histogram's finite buckets
    assert ratio == 0.0
