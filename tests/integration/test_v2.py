"""Open Inference Protocol v2 against the real server, with a real client this project did not write
(``tritonclient.http``), JSON and binary tensor data, and every bad request's status and error body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from conftest import Server, metric

pytestmark = pytest.mark.integration

X = np.array([[1, 2, 3, 4], [0.5, 0, 0, 0], [-1, -1, 0, 2]], dtype=np.float32)


def linear(x: np.ndarray, weight: float = 2.0) -> np.ndarray:
    return np.repeat(weight * x.sum(axis=1, keepdims=True) + 1, 3, axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def client(ferry_server: Server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(ferry_server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def mlp_session(registry: Any) -> Any:
    """The tabular MLP's ONNX file run by ONNX Runtime directly: the model's own outputs."""
    import mlflow
    import onnxruntime

    path = mlflow.artifacts.download_artifacts("models:/tabular-mlp-onnx/1")
    return onnxruntime.InferenceSession(f"{path}/model.onnx", providers=["CPUExecutionProvider"])


def test_health_and_server_metadata(client: triton.InferenceServerClient, ferry_server: Server) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == {
        "name": "ferry",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }
    assert httpx.get(f"{ferry_server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{ferry_server.url}/v2/health/ready").json() == {"ready": True}


def test_model_readiness(client: triton.InferenceServerClient, ferry_server: Server) -> None:
    for name in ("linear", "linear-onnx", "tabular-mlp-onnx"):
        assert client.is_model_ready(name) and client.is_model_ready(name, "1")
    assert not client.is_model_ready("linear", "2")  # registered, not loaded
    assert not client.is_model_ready("nope")
    r = httpx.get(f"{ferry_server.url}/v2/models/linear/ready")
    assert r.status_code == 200 and r.json() == {"name": "linear", "ready": True}
    r = httpx.get(f"{ferry_server.url}/v2/models/linear/versions/2/ready")
    assert r.status_code == 404 and r.json() == {
        "error": "model 'linear' version '2' is not loaded; loaded version(s): ['1']"
    }


def test_model_metadata_from_the_signature(client: triton.InferenceServerClient) -> None:
    assert client.get_model_metadata("linear-onnx") == {
        "name": "linear-onnx",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}],
    }
    torch = client.get_model_metadata("linear", "1")
    assert torch["platform"] == "mlflow_pytorch" and torch["versions"] == ["1"]
    assert torch["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    mlp = client.get_model_metadata("tabular-mlp-onnx")
    assert mlp["inputs"][0]["shape"] == [-1, 64] and mlp["outputs"][0]["shape"] == [-1, 10]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("linear", "2")
    assert info.value.status() == "404" and "loaded version(s): ['1']" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404" and "'nope' is not served" in info.value.message()


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("model", ["linear", "linear-onnx"])
def test_infer_is_exact(
    client: triton.InferenceServerClient, model: str, binary_in: bool, binary_out: bool
) -> None:
    tensor = triton.InferInput("input", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X, binary_data=binary_in)
    result = client.infer(
        model,
        [tensor],
        outputs=[triton.InferRequestedOutput("output", binary_data=binary_out)],
        request_id=f"req-{model}",
    )
    out = result.as_numpy("output")
    assert out.dtype == np.float32 and np.array_equal(out, linear(X))
    response = result.get_response()
    assert response["id"] == f"req-{model}"
    assert response["model_name"] == model and response["model_version"] == "1"
    assert ("parameters" in response["outputs"][0]) is binary_out


def test_infer_64_rows_of_the_mlp_binary_and_json(
    client: triton.InferenceServerClient, mlp_session: Any
) -> None:
    x = np.random.default_rng(11).standard_normal((64, 64)).astype(np.float32)
    expected = mlp_session.run(None, {"input": x})[0]
    for binary in (True, False):
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        out = client.infer("tabular-mlp-onnx", [tensor], model_version="1").as_numpy("output")
        assert out.shape == (64, 10)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_parameters_pass_through_and_headers(ferry_server: Server) -> None:
    body = {
        "id": "p1",
        "parameters": {"temperature": 0.5},
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [[1, 1, 1, 1]]}],
    }
    r = httpx.post(f"{ferry_server.url}/v2/models/linear-onnx/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json" and r.headers["X-Model-Version"] == "1"
    assert r.json() == {
        "model_name": "linear-onnx",
        "model_version": "1",
        "id": "p1",
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 3], "data": [9.0, 9.0, 9.0]}],
    }


def test_binary_response_layout(ferry_server: Server) -> None:
    body = (
        b'{"inputs":[{"name":"input","shape":[2,4],"datatype":"FP32","parameters":{"binary_data_size":32}}],'
    )
    body += b'"parameters":{"binary_data_output":true}}'
    r = httpx.post(
        f"{ferry_server.url}/v2/models/linear/versions/1/infer",
        content=body + X[:2].tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(body)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers["Inference-Header-Content-Length"])
    header = httpx.Response(200, content=r.content[:length]).json()
    assert header["outputs"] == [
        {"name": "output", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}
    ]
    assert np.array_equal(np.frombuffer(r.content[length:], dtype="<f4").reshape(2, 3), linear(X[:2]))


def _json_input(**changes: Any) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4], **changes}]
    }


FLOATS = np.ones(4, dtype=np.float32).tobytes()
BINARY_HEADER = (
    b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","parameters":{"binary_data_size":16}}]}'
)

BAD: list[tuple[str, str, Any, dict[str, str], int, str]] = [
    ("wrong datatype", "linear", _json_input(datatype="BYTES", data=["a", "b", "c", "d"]), {}, 400,
     "input 'input': expected float32 values"),
    ("unknown datatype", "linear", _json_input(datatype="FLOAT32"), {}, 400, "datatype 'FLOAT32' is not one of"),
    ("data not of datatype", "linear", _json_input(datatype="INT32", data=[1.5, 2, 3, 4]), {}, 400,
     "datatype INT32 but 'data' holds float64"),
    ("shape vs data", "linear", _json_input(shape=[2, 4]), {}, 400, "shape [2, 4] holds 8 values but 'data' has 4"),
    ("feature count", "linear", _json_input(shape=[1, 3], data=[1, 2, 3]), {}, 400,
     "expected shape [-1, 4] (rows first), got [1, 3]"),
    ("unknown input", "linear-onnx", _json_input(name="x"), {}, 400, "unknown input 'x'; the model takes ['input']"),
    ("no inputs", "linear", {"outputs": []}, {}, 400, "'inputs' must be a non-empty list"),
    ("unknown output", "linear", {**_json_input(), "outputs": [{"name": "logits"}]}, {}, 400,
     "unknown output 'logits'; the model produces ['output']"),
    ("classification", "linear", {**_json_input(), "outputs": [{"name": "output", "parameters": {"classification": 2}}]},
     {}, 400, "classification extension is not supported"),
    ("id not a string", "linear", {**_json_input(), "id": 7}, {}, 400, "'id' must be a string"),
    ("not json", "linear", b"{inputs", {}, 400, "not valid JSON"),
    ("binary size past the body", "linear", BINARY_HEADER + FLOATS[:8],
     {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, 400, "binary_data_size 16 goes past the 8 bytes"),
    ("binary bytes left over", "linear", BINARY_HEADER + FLOATS + FLOATS,
     {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, 400, "add up to 16 bytes but 32 bytes"),
    ("header length past the body", "linear", BINARY_HEADER, {"Inference-Header-Content-Length": "999"}, 400,
     "outside the body"),
    ("header length not a number", "linear", BINARY_HEADER, {"Inference-Header-Content-Length": "x"}, 400,
     "not an integer"),
    ("binary without header length", "linear", BINARY_HEADER + FLOATS, {}, 400, "not valid JSON"),
    ("unknown model", "nope", _json_input(), {}, 404, "'nope' is not served"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "model", "body", "headers", "status", "fragment"), BAD, ids=[c[0] for c in BAD]
)
def test_bad_requests_get_the_protocols_error(
    ferry_server: Server,
    case: str,
    model: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    fragment: str,
) -> None:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{ferry_server.url}/v2/models/{model}/infer", headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"] and fragment in r.json()["error"], r.json()


def test_a_version_that_is_not_loaded_is_404(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(X[:1])
    with pytest.raises(InferenceServerException) as info:
        client.infer("linear", [tensor], model_version="2")
    assert info.value.status() == "404"
    assert info.value.message() == "model 'linear' version '2' is not loaded; loaded version(s): ['1']"


def test_unknown_v2_paths_keep_the_protocols_error(ferry_server: Server) -> None:
    r = httpx.get(f"{ferry_server.url}/v2/repository/index")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}


def test_requests_are_counted_under_the_v2_protocol(ferry_server: Server) -> None:
    def count() -> tuple[float, float]:
        text = httpx.get(f"{ferry_server.url}/metrics").text
        return (
            metric(text, "ferry_inference_requests_total", model="linear-onnx", protocol="v2"),
            metric(text, "ferry_requests_rejected_total", model="linear-onnx", reason="invalid_input"),
        )

    before = count()
    url = f"{ferry_server.url}/v2/models/linear-onnx/infer"
    assert httpx.post(url, json=_json_input()).status_code == 200
    assert httpx.post(url, json=_json_input(shape=[2, 4])).status_code == 400
    after = count()
    assert after[0] - before[0] == 1 and after[1] - before[1] == 1


def test_openapi_documents_the_v2_routes(ferry_server: Server) -> None:
    paths = httpx.get(f"{ferry_server.url}/openapi.json").json()["paths"]
    infer = paths["/v2/models/{name}/infer"]["post"]
    schema = infer["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" not in str(schema) and "inputs" in schema["properties"]
    assert {
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}/versions/{version}/ready",
    } <= set(paths)
