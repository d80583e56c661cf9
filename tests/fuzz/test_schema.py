"""Schemathesis against Ferry's own OpenAPI schema, on a real server: no generated request gets a 5xx,
and responses match the schema. Deterministic generation, so a failure reproduces."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Server

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_no_generated_request_gets_a_server_error(ferry_server: Server, tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("schemathesis")
    result = subprocess.run(
        [
            str(cli), "--config-file", str(CONFIG), "run", f"{ferry_server.url}/openapi.json",
            "--checks", "not_a_server_error,response_schema_conformance",
            "--max-examples", "30", "--generation-deterministic", "--request-timeout", "30",
            "--report", "junit", "--report-dir", str(tmp_path),
        ],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=os.environ | {"NO_COLOR": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "generated" in result.stdout and " 0 passed" not in result.stdout
    assert "unexpected error" not in ferry_server.log()
