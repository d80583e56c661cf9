"""API keys, the admin API, body and row limits, slow clients, CORS: against a real uvicorn Ferry."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Registry, Server, start_server, stop_server, wait_until_ready

pytestmark = pytest.mark.integration
KEY, ADMIN = "k3y-for-tests", "adm1n-token-for-tests"
ROW = {"model": "linear", "inputs": [[1, 2, 3, 4]]}


@pytest.fixture(scope="module")
def guarded(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        registry,
        "linear=models:/linear@champion",
        tmp_path_factory.mktemp("guarded"),
        {
            "FERRY_API_KEYS": f"other-key,{KEY}",
            "FERRY_ADMIN_TOKEN": ADMIN,
            "FERRY_LIMITS__MAX_BODY_BYTES": "4096",
            "FERRY_LIMITS__MAX_ROWS": "8",
            "FERRY_CORS_ORIGINS": "https://app.example",
        },
    )
    yield server
    stop_server(server)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": "Basic " + KEY}],
    ids=["missing", "wrong-bearer", "wrong-header", "wrong-scheme"],
)
def test_inference_needs_a_key_and_the_refusal_leaks_nothing(
    guarded: Server, headers: dict[str, str]
) -> None:
    r = httpx.post(f"{guarded.url}/predict", json=ROW, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["message"] == "missing or invalid credentials"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert KEY not in r.text and "wrong" not in r.text


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}])
def test_right_key_is_served(guarded: Server, headers: dict[str, str]) -> None:
    r = httpx.post(f"{guarded.url}/predict", json=ROW, headers=headers)
    assert r.status_code == 200 and r.json()["outputs"] == [[21.0] * 3]


def test_health_and_metrics_stay_open(guarded: Server) -> None:
    assert httpx.get(f"{guarded.url}/health/ready").status_code == 200
    assert httpx.get(f"{guarded.url}/metrics").status_code == 200


def test_secrets_never_reach_the_log(guarded: Server) -> None:
    httpx.post(f"{guarded.url}/predict", json=ROW, headers={"Authorization": f"Bearer {KEY}"})
    log = guarded.log()
    assert KEY not in log and ADMIN not in log


def test_admin_api_requires_its_token(guarded: Server, ferry_server: Server) -> None:
    assert httpx.get(f"{ferry_server.url}/admin/models").status_code == 404  # no token configured: absent
    assert httpx.get(f"{guarded.url}/admin/models").status_code == 401
    assert (
        httpx.get(f"{guarded.url}/admin/models", headers={"Authorization": f"Bearer {KEY}"}).status_code
        == 401
    )
    assert httpx.get(f"{guarded.url}/admin/models", headers={"X-API-Key": ADMIN}).status_code == 401
    auth = {"Authorization": f"Bearer {ADMIN}"}
    listed = httpx.get(f"{guarded.url}/admin/models", headers=auth)
    assert listed.status_code == 200 and [m["name"] for m in listed.json()["models"]] == ["linear"]


def test_admin_loads_reloads_and_unloads(guarded: Server) -> None:
    auth, key = {"Authorization": f"Bearer {ADMIN}"}, {"X-API-Key": KEY}
    r = httpx.put(
        f"{guarded.url}/admin/models/second",
        json={"uri": "models:/linear@challenger"},
        headers=auth,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["version"] == "2" and r.json()["state"] == "ready"
    r = httpx.post(f"{guarded.url}/models/second/predict", json={"inputs": [[1, 0, 0, 0]]}, headers=key)
    assert r.json()["outputs"] == [[4.0] * 3]  # weight 3, bias 1
    assert (
        httpx.post(f"{guarded.url}/admin/models/second/reload", headers=auth, timeout=60).status_code == 200
    )
    assert httpx.delete(f"{guarded.url}/admin/models/second", headers=auth).status_code == 204
    r = httpx.post(f"{guarded.url}/models/second/predict", json={"inputs": [[1, 0, 0, 0]]}, headers=key)
    assert r.status_code == 404
    assert httpx.delete(f"{guarded.url}/admin/models/second", headers=auth).status_code == 404
    bad = httpx.put(f"{guarded.url}/admin/models/third", json={"uri": "s3://nope"}, headers=auth)
    assert bad.status_code >= 400 and bad.status_code != 500


def test_oversized_body_is_refused_before_it_is_read(guarded: Server) -> None:
    """Declare 10 MB, send only the headers: the 413 arrives without the server waiting for the body."""
    host, port = guarded.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-API-Key: {KEY}\r\nContent-Length: 10000000\r\n\r\n".encode()
            + b'{"inputs": ['
        )
        reply = b""
        while b"MAX_BODY" not in reply:
            chunk = conn.recv(4096)  # bounded by the socket timeout
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"FERRY_LIMITS__MAX_BODY_BYTES" in reply


def test_chunked_body_over_the_limit_is_413(guarded: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": [['
        for _ in range(2000):
            yield b"1.0,"
        yield b"1.0]]}"

    r = httpx.post(f"{guarded.url}/predict", content=chunks(), headers={"X-API-Key": KEY})
    assert r.status_code == 413


def test_too_many_rows_is_413(guarded: Server) -> None:
    r = httpx.post(f"{guarded.url}/predict", json={"inputs": [[1, 2, 3, 4]] * 9}, headers={"X-API-Key": KEY})
    assert r.status_code == 413 and "FERRY_LIMITS__MAX_ROWS" in r.json()["error"]["message"]


def test_a_slow_client_does_not_block_others(guarded: Server) -> None:
    host, port = guarded.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)), timeout=10)
    try:
        slow.sendall(
            b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n{"inputs"'
        )  # and stalls
        started = time.monotonic()
        for _ in range(20):
            r = httpx.post(f"{guarded.url}/predict", json=ROW, headers={"X-API-Key": KEY}, timeout=5)
            assert r.status_code == 200
        assert time.monotonic() - started < 5  # bounded: these would hang if the slow client blocked the loop
    finally:
        slow.close()


def test_cors_only_for_configured_origins(guarded: Server, ferry_server: Server) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{guarded.url}/predict", headers=preflight)
    assert r.headers.get("access-control-allow-origin") == "https://app.example"
    r = httpx.options(f"{guarded.url}/predict", headers=preflight | {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{ferry_server.url}/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers  # CORS off unless configured


def test_metrics_and_health_can_move_to_their_own_port(registry: Registry, tmp_path: Path) -> None:
    from conftest import free_port

    ops_port = free_port()
    server = start_server(
        registry,
        "linear=models:/linear@champion",
        tmp_path,
        {"FERRY_METRICS_PORT": str(ops_port)},
        wait_ready=False,
    )
    ops = f"http://127.0.0.1:{ops_port}"
    try:
        wait_until_ready(server, ops_url=ops)
        assert httpx.post(f"{server.url}/predict", json=ROW).status_code == 200
        assert "ferry_inference_requests_total" in httpx.get(f"{ops}/metrics").text
        assert httpx.get(f"{server.url}/metrics").status_code == 404
        assert httpx.get(f"{server.url}/health/ready").status_code == 404
        assert httpx.post(f"{ops}/predict", json=ROW).status_code in {404, 405}
    finally:
        assert stop_server(server) == 0


def test_a_flavor_that_is_not_allowed_is_not_loaded_and_says_which_setting_allows_it(
    registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The default, ``onnx,pytorch``: a custom pyfunc model (whose loading runs its code) is refused; the
    PyTorch model beside it serves."""
    import numpy as np

    from conftest import register_code_model

    example = np.zeros((1, 3), dtype=np.float32)
    here = Path(__file__).parent
    register_code_model(registry, "scaler-guarded", here / "scaler_model.py", example, {"scale": 1.0})
    server = start_server(
        registry,
        "linear=models:/linear@champion,code=models:/scaler-guarded@champion",
        tmp_path_factory.mktemp("flavors"),
        {"FERRY_ALLOWED_FLAVORS": "onnx,pytorch"},
        wait_ready=False,
    )
    try:
        deadline = time.monotonic() + 90
        models: dict[str, dict[str, str]] = {}
        while time.monotonic() < deadline:
            try:
                listed = httpx.get(f"{server.url}/models", timeout=5).json()["models"]
            except httpx.TransportError:  # not listening yet
                time.sleep(0.2)
                continue
            models = {m["name"]: m for m in listed}
            if models["code"]["state"] == "failed" and models["linear"]["state"] == "ready":
                break
            time.sleep(0.2)
        error = models["code"]["error"]
        assert "flavor 'python_function' is not allowed" in error and "FERRY_ALLOWED_FLAVORS" in error
        assert models["linear"]["state"] == "ready"
        assert (
            httpx.post(f"{server.url}/models/code/predict", json={"inputs": [[1, 2, 3]]}).status_code == 503
        )
        assert httpx.post(f"{server.url}/predict", json=ROW).status_code == 200
        assert "flavor 'python_function' is not allowed" in server.log()
    finally:
        stop_server(server)
