"""A short run of the soak (``loadtests/soak.py``): 20 s of every kind of client at 64 connections against
a real Ferry on a registry of the script's own, the alias moved twice. The full soak is ``make soak`` (10
minutes; its figures are in the README's Reliability table). Nothing here asserts a time or a rate: only
that every criterion held (the exit status) and that every kind of traffic ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

KINDS = ("valid", "invalid", "oversized", "slow", "hangup")
OPEN_FAULTS: dict[str, str] = {}
"""Faults of Ferry the soak found and that are not fixed yet: a run that fails on these alone is an
expected failure. Delete an entry with its fix; an empty dict leaves the test strict."""


def only_open_faults(report: dict) -> bool:
    """Whether the run failed on ``OPEN_FAULTS`` alone: the only outcomes not expected are heads over the
    limit answered without a 431 and valid requests answered 503 'model is shutting down', and the only
    failed checks are those these fail."""
    if not set(report["unexpected"]) <= {"oversized", "valid"}:
        return False
    allowed = {"oversized/length": {"413"}, "oversized/chunked": {"413"}, "oversized/rows": {"413"}}
    if "oversized/headers" not in OPEN_FAULTS:
        allowed["oversized/headers"] = {"431"}
    for sub in ("ferry", "v2", "mlflow"):
        allowed[f"valid/{sub}"] = {"200", "503"} if "valid/503" in OPEN_FAULTS else {"200"}
    for kind, entry in report["requests"].items():
        for sub, outcomes in entry["subkinds"].items():
            if f"{kind}/{sub}" in allowed and not set(outcomes) <= allowed[f"{kind}/{sub}"]:
                return False
    examples = report["examples"].get("valid", [])
    if not all("model is shutting down" in example.get("answer", "") for example in examples):
        return False
    refused = report["requests"]["valid"]["outcomes"].get("503", 0)
    if not report["server"]["5xx"] == report["client_5xx"] == refused:
        return False
    explained = {
        "no 5xx seen by a client",
        "no 5xx counted by the server",
        "every valid request answered 200",
        "every client answered as expected",
    }
    return {c["name"] for c in report["checks"] if not c["ok"]} <= explained


def test_short_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    argv = [sys.executable, str(ROOT / "loadtests" / "soak.py"), "--duration", "20", "--connections", "64"]
    argv += ["--out", str(out), "--progress", "10"]
    completed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=420)
    output = completed.stdout[-6000:] + completed.stderr[-3000:]
    report_file = out / "soak.json"
    assert report_file.exists(), f"no report (exit {completed.returncode}):\n{output}"
    report = json.loads(report_file.read_text())
    failed = [c for c in report["checks"] if not c["ok"]]
    if failed and only_open_faults(report):
        pytest.xfail(f"only Ferry's open faults (see OPEN_FAULTS): {failed}")
    assert completed.returncode == 0 and report["passed"], f"{failed}\n{report['examples']}\n{output}"

    for key in ("requests", "valid", "swaps", "rss", "server", "checks", "samples", "client_5xx"):
        assert key in report, key
    for kind in KINDS:
        assert report["requests"][kind]["total"] > 0, kind
    # Every way of misbehaving was tried at least once.
    subkinds = {kind: set(report["requests"][kind]["subkinds"]) for kind in KINDS}
    assert subkinds["valid"] == {"ferry", "v2", "mlflow"}
    assert subkinds["oversized"] == {"length", "chunked", "rows", "headers"}
    assert subkinds["slow"] == {"headers", "body", "silent"}
    assert subkinds["hangup"] == {"after-request", "mid-body", "mid-headers"}
    assert report["valid"]["wrong"] == 0 and report["valid"]["failed"] == 0
    assert report["client_5xx"] == 0 and report["server"]["5xx"] == 0
    assert sorted(report["valid"]["answered_by_version"]) == ["1", "2", "3"]
    assert [s["version"] for s in report["swaps"]] == ["2", "3"]
    for figure in ("warmup_mib", "end_mib", "max_mib", "growth_pct"):
        assert figure in report["rss"], figure
