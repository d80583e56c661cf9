"""``/docs`` renders in a real headless browser that can reach nothing but 127.0.0.1, as in an
air-gapped cluster: Swagger UI's script and style come from Ferry itself (service/api/docs.py), not from
a CDN. A second run against FastAPI's default CDN page shows the check can fail: there the page stays
blank. Debian's ``chromium`` (scripts/tools.sh installs it); the test skips, saying so, without it.

The screenshot is kept in ``tests/artifacts/docs-page.png`` (ignored by git) and its path printed."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from conftest import free_port

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
OPERATIONS = {
    "/predict",
    "/models/{name}/predict",
    "/v2/models/{name}/infer",
    "/invocations",
    "/health/ready",
}
"""Operations of each protocol that the rendered page must show."""


class _Server(Protocol):
    url: str


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium is not on PATH: `make tools` installs Debian's chromium package as root")
    return path


def render(url: str, screenshot: Path) -> str:
    """The DOM of ``url`` after Swagger UI had 10 s of virtual time, in a headless Chromium whose every
    connection except to 127.0.0.1 fails (a dead proxy for everything else, and no name resolves)."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",  # as root, and in containers without user namespaces
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--proxy-server=http://127.0.0.1:9",
                "--proxy-bypass-list=127.0.0.1;localhost",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                "--virtual-time-budget=10000",
                "--window-size=1280,1600",
                f"--screenshot={screenshot}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result.stdout


def rendered_operations(dom: str) -> set[str]:
    """Paths of the operation blocks (``opblock``) Swagger UI rendered."""
    return set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))


def test_docs_page_renders_the_operations_without_internet(ferry_server: _Server) -> None:
    page = httpx.get(f"{ferry_server.url}/docs", timeout=10)
    assert page.status_code == 200
    external = re.findall(r'(?:src|href)="(https?://[^"]+)"', page.text)
    assert not external, f"/docs loads from outside Ferry: {external}"
    screenshot = ARTIFACTS / "docs-page.png"
    dom = render(f"{ferry_server.url}/docs", screenshot)
    print(f"screenshot of /docs: {screenshot}")
    found = rendered_operations(dom)
    assert not OPERATIONS - found, f"not rendered: {sorted(OPERATIONS - found)}; rendered: {sorted(found)}"
    assert screenshot.stat().st_size > 10_000, "the screenshot is blank"
    assert httpx.get(f"{ferry_server.url}/redoc", timeout=10).status_code == 404, "README: /redoc is off"


@pytest.fixture
def cdn_docs() -> Iterator[str]:
    """FastAPI's own /docs page, whose Swagger UI comes from a CDN, served by uvicorn in a thread."""
    app = FastAPI()

    @app.post("/predict")
    async def predict() -> dict[str, str]:
        return {}

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_check_fails_on_a_cdn_page(cdn_docs: str) -> None:
    """Without the network, FastAPI's default page renders nothing: the network is really cut, and the
    check above really looks at what Swagger UI drew."""
    dom = render(f"{cdn_docs}/docs", ARTIFACTS / "docs-page-cdn.png")
    assert "cdn.jsdelivr.net" in dom
    assert rendered_operations(dom) == set()
