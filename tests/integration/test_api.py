"""The real app served by uvicorn: predictions, batching evidence, every bad input's status and message."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import Registry, Server, metric, start_server, stop_server

pytestmark = pytest.mark.integration


def expected_linear(row: list[float]) -> list[float]:
    return [2 * sum(row) + 1] * 3


def test_predict_returns_exact_outputs_and_headers(ferry_server: Server) -> None:
    r = httpx.post(
        f"{ferry_server.url}/predict", json={"model": "linear", "inputs": [[1, 2, 3, 4], [0.5, 0, 0, 0]]}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"model": "linear", "version": "1", "outputs": [[21.0] * 3, [2.0] * 3]}
    assert r.headers["X-Model-Version"] == "1" and r.headers["X-Cache"] in {"hit", "miss"}
    r = httpx.post(
        f"{ferry_server.url}/models/linear-onnx/predict", json={"inputs": {"input": [[1, 1, 1, 1]]}}
    )
    assert r.status_code == 200 and r.json()["outputs"] == [[9.0] * 3]


def test_outputs_round_trip_as_float32(ferry_server: Server) -> None:
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    r = httpx.post(f"{ferry_server.url}/predict", json={"model": "tabular-mlp-onnx", "inputs": x.tolist()})
    assert r.status_code == 200, r.text
    out = np.array(r.json()["outputs"], dtype=np.float32)
    assert out.shape == (3, 10)
    text = r.text.split('"outputs":')[1]
    first = text.strip("[]").split(",")[0]
    assert np.float32(first) == out[0, 0] and len(first) <= 12  # shortest float32 repr, not float64 noise


def test_models_and_health(ferry_server: Server) -> None:
    ready = httpx.get(f"{ferry_server.url}/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "models": dict.fromkeys(["linear", "linear-onnx", "tabular-mlp-onnx"], "ready"),
    }
    assert httpx.get(f"{ferry_server.url}/health/live").json() == {"status": "live"}
    listed = httpx.get(f"{ferry_server.url}/models").json()
    assert [m["name"] for m in listed["models"]] == ["linear", "linear-onnx", "tabular-mlp-onnx"]
    onnx = httpx.get(f"{ferry_server.url}/models/linear-onnx").json()
    assert (
        onnx["flavor"] == "onnx" and onnx["device"] == "cpu" and onnx["providers"] == ["CPUExecutionProvider"]
    )
    assert onnx["alias"] == "champion" and onnx["version"] == "1"
    assert onnx["signature"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 4]}]
    assert onnx["batching"]["max_rows"] > 0
    assert httpx.get(f"{ferry_server.url}/models/nope").status_code == 404
    docs = httpx.get(f"{ferry_server.url}/openapi.json").json()
    assert "/predict" in docs["paths"] and "requestBody" in docs["paths"]["/predict"]["post"]


@pytest.fixture(scope="module")
def windowed_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A Ferry whose batches wait up to 25 ms for company, so that a client slower than the model (httpx
    in one thread is) still produces concurrent arrivals for the server to coalesce."""
    server = start_server(
        registry,
        "linear=models:/linear@champion",
        tmp_path_factory.mktemp("windowed"),
        {"FERRY_BATCH__MAX_WAIT_MS": "25"},
    )
    yield server
    stop_server(server)


@pytest.mark.asyncio
async def test_200_concurrent_requests_are_exact_and_batched(windowed_server: Server) -> None:
    ferry_server = windowed_server
    rng = np.random.default_rng(3)
    rows = rng.integers(-50, 50, size=(200, 4)).astype(float).tolist()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=ferry_server.url, limits=limits, timeout=60) as client:
        before = (await client.get("/metrics")).text
        responses = await asyncio.gather(
            *(client.post("/predict", json={"model": "linear", "inputs": [row]}) for row in rows)
        )
        after = (await client.get("/metrics")).text
    assert [r.status_code for r in responses] == [200] * 200
    for row, response in zip(rows, responses, strict=True):
        assert response.json()["outputs"] == [expected_linear(row)]
    calls = metric(after, "ferry_batch_rows_count", model="linear") - metric(
        before, "ferry_batch_rows_count", model="linear"
    )
    answered = metric(after, "ferry_batch_rows_sum", model="linear") - metric(
        before, "ferry_batch_rows_sum", model="linear"
    )
    assert answered == 200
    assert 1 <= calls < 200, f"{calls} model calls for 200 requests: no batching happened"


BAD_INPUTS: list[tuple[str, Any, int, str]] = [
    ("not json", b"{inputs: [[1,2,3,4]]", 400, "not valid JSON"),
    ("nan literal", b'{"model": "linear", "inputs": [[NaN, 1, 2, 3]]}', 400, "NaN"),
    ("array body", [[1, 2, 3, 4]], 400, "must be a JSON object"),
    ("no inputs", {"model": "linear"}, 422, "'inputs' is required"),
    (
        "wrong dtype",
        {"model": "linear", "inputs": [["a", "b", "c", "d"]]},
        422,
        "expected float32 values, got strings",
    ),
    (
        "feature count",
        {"model": "linear", "inputs": [[1, 2, 3]]},
        422,
        "expected shape [-1, 4] (rows first), got [1, 3]",
    ),
    ("ragged", {"model": "linear", "inputs": [[1, 2, 3, 4], [1, 2]]}, 422, "ragged"),
    ("null", {"model": "linear", "inputs": [[1, None, 3, 4]]}, 422, "non-numeric"),
    ("unknown input", {"model": "linear", "inputs": {"x": [[1, 2, 3, 4]]}}, 422, "unknown input(s) ['x']"),
    ("empty batch", {"model": "linear", "inputs": []}, 422, "expected shape"),
    ("too large", {"model": "linear", "inputs": [[1e39, 0, 0, 0]]}, 422, "too large for float32"),
    ("model not a string", {"model": 3, "inputs": [[1, 2, 3, 4]]}, 422, "'model' must be a string"),
    ("unknown model", {"model": "nope", "inputs": [[1, 2, 3, 4]]}, 404, "'nope' is not served"),
]


@pytest.mark.parametrize(("case", "body", "status", "fragment"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx(
    ferry_server: Server, case: str, body: Any, status: int, fragment: str
) -> None:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{ferry_server.url}/predict", headers={"Content-Type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"], error
    assert error["code"] in {"bad_request", "invalid_input", "model_not_found"}


def test_path_and_body_model_must_agree(ferry_server: Server) -> None:
    r = httpx.post(
        f"{ferry_server.url}/models/linear/predict", json={"model": "linear-onnx", "inputs": [[1, 2, 3, 4]]}
    )
    assert r.status_code == 422 and "path names 'linear'" in r.json()["error"]["message"]


@pytest.mark.asyncio
async def test_bad_inputs_do_not_disturb_good_requests_in_flight(ferry_server: Server) -> None:
    async with httpx.AsyncClient(base_url=ferry_server.url, timeout=60) as client:
        good = [
            client.post("/predict", json={"model": "linear", "inputs": [[i, 0, 0, 0]]}) for i in range(60)
        ]
        bad = [client.post("/predict", json={"model": "linear", "inputs": [[i, 0]]}) for i in range(60)]
        results = await asyncio.gather(*good, *bad)
        metrics = (await client.get("/metrics")).text
    assert [r.json()["outputs"] for r in results[:60]] == [[[2 * i + 1.0] * 3] for i in range(60)]
    assert {r.status_code for r in results[60:]} == {422}
    assert metric(metrics, "ferry_requests_rejected_total", model="linear", reason="invalid_input") >= 60
