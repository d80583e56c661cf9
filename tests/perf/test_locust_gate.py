"""The Locust smoke gate of ``make test``: the users of ``loadtests/locustfile.py`` against the floor for
6 s, then against a real Ferry for 12 s, gated by ``[gate.smoke]`` of ``loadtests/thresholds.toml``.

Every bound lives in that file (chosen to hold on a busy 2-core machine and to fail a Ferry three times
slower); this test only starts Ferry, runs ``loadtests/loadtest.py`` (Locust in a subprocess: it
monkey-patches with gevent) and reports what the gate found.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, Registry, start_server, stop_server

pytestmark = pytest.mark.integration

MODELS = (
    "tabular-mlp-onnx=models:/tabular-mlp-onnx@champion,linear=models:/linear@champion,"
    "linear-onnx=models:/linear-onnx@champion"
)
"""``tabular-mlp-onnx`` first: ``/invocations`` answers with the default (first) model."""


def test_locust_smoke_gate(registry: Registry, tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    server = start_server(registry, MODELS, tmp_path)
    argv = [sys.executable, str(ROOT / "loadtests" / "loadtest.py"), "--profile", "smoke"]
    argv += ["--duration", "12", "--floor-duration", "6", "--users", "16", "--reports", str(reports)]
    try:
        argv += ["--url", server.url, "--server-pid", str(server.process.pid)]
        completed = subprocess.run(
            argv,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        stop_server(server)
    output = completed.stdout[-4000:] + completed.stderr[-4000:]
    report_file = reports / "ferry.json"
    assert report_file.exists(), f"the gate wrote no report (exit {completed.returncode}):\n{output}"
    report = json.loads(report_file.read_text())
    failed = [c for c in report["checks"] if c["ok"] is False]
    skipped = [c["name"] for c in report["checks"] if c["ok"] is None]
    assert not skipped, f"checks that could not be made: {skipped}\n{output}"
    assert report["passed"] and not failed, f"gate failed: {failed}\n{output}\n{server.log()[-2000:]}"
    assert completed.returncode == 0, output
    assert report["invalid_requests"] > 0 and report["valid_requests"] > 0
