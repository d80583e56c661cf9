"""The Open Inference Protocol over gRPC (issue 16) against a real Ferry (``FERRY_GRPC_PORT`` on a free port,
beside its HTTP port), with Triton's own client (``tritonclient.grpc``) and with plain grpcio calls on
Ferry's message classes (``service.grpc.messages``: typed contents, which Triton's client never sends):

- health, readiness and metadata answer as REST v2 does;
- ``ModelInfer`` answers what REST v2 answers for the same inputs (``tabular-mlp-onnx`` at 64 rows, one
  ``image-cnn`` image), raw or typed, the answer in the form asked;
- bad calls get the status code of their HTTP status and a message naming what is wrong: an unknown model
  (NOT_FOUND), a wrong shape or datatype, an unknown or missing input (INVALID_ARGUMENT), a missing or
  wrong API key (UNAUTHENTICATED), the client's deadline and Ferry's (DEADLINE_EXCEEDED), a message above
  FERRY_LIMITS__MAX_BODY_BYTES (RESOURCE_EXHAUSTED);
- every call is counted: the model's metrics by protocol ``grpc``, and ``ferry_grpc_requests_total``;
- SIGTERM drains: a call in flight is answered, then the process exits 0.

The server runs with the cache off, so every answer is computed, not replayed from REST's.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from conftest import (
    Registry,
    Server,
    free_port,
    log_torch,
    metric,
    register_code_model,
    start_server,
    stop_server,
    wait_until,
)
from service.grpc import messages

pytestmark = pytest.mark.integration

KEY = "grpc-test-key-0123456789"
MODELS = (
    "tabular-mlp-onnx=models:/tabular-mlp-onnx@champion,image-cnn=models:/image-cnn@champion,"
    "gated=models:/gated@champion"
)
MAX_BODY = 1 << 20
TIMEOUT_MS = 5000
GATED_X = np.zeros((2, 3), dtype=np.float32)


def register_image_cnn(registry: Registry) -> None:
    """The demo's image CNN (3x64x64 float32 -> 10 logits), seeded and untrained, as ``image-cnn@champion``
    (once per registry)."""
    import mlflow
    import nets
    import torch
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(registry.tracking_uri)
    client = MlflowClient()
    try:
        client.get_model_version_by_alias("image-cnn", "champion")
        return
    except mlflow.exceptions.MlflowException:
        pass
    torch.manual_seed(0)
    cnn = nets.ImageCNN().eval()
    example = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    tests = mlflow.get_experiment_by_name("tests")
    with mlflow.start_run(experiment_id=tests.experiment_id if tests else None):
        info = log_torch(cnn, example)
    version = mlflow.register_model(info.model_uri, "image-cnn")
    client.set_registered_model_alias("image-cnn", "champion", version.version)


@pytest.fixture(scope="module")
def models(registry: Registry) -> Registry:
    """The session's registry with ``image-cnn`` and ``gated`` (a model held at a gate) registered too."""
    register_image_cnn(registry)
    register_code_model(
        registry, "gated", Path(__file__).with_name("gated_model.py"), GATED_X, {"gate": "", "log": ""}
    )
    return registry


@pytest.fixture(scope="module")
def server(models: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    env = {
        "FERRY_GRPC_PORT": str(port),
        "FERRY_API_KEYS": KEY,
        "FERRY_CACHE__ENABLED": "false",
        "FERRY_LIMITS__MAX_BODY_BYTES": str(MAX_BODY),
        "FERRY_BATCH__TIMEOUT_MS": str(TIMEOUT_MS),
    }
    server = start_server(models, MODELS, tmp_path_factory.mktemp("grpc"), env)
    server.grpc = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.grpc)  # type: ignore[attr-defined]
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc) as channel:  # type: ignore[attr-defined]
        yield channel


AUTH = {"authorization": f"Bearer {KEY}"}
METADATA = (("x-api-key", KEY),)


def rpc(
    channel: grpc.Channel, method: str, request: Any, metadata: Any = METADATA, timeout: float = 60
) -> Any:
    """One call of ``inference.GRPCInferenceService/<method>`` with Ferry's message classes."""
    request_class, response_class = messages.METHODS[method]
    assert isinstance(request, request_class)
    call = channel.unary_unary(
        f"/{messages.SERVICE}/{method}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return call(request, metadata=metadata, timeout=timeout)


def rest_infer(server: Server, model: str, inputs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """REST v2's answer (JSON) for the same inputs, as arrays by output name."""
    r = httpx.post(
        f"{server.url}/v2/models/{model}/infer",
        json={"inputs": inputs},
        headers={"X-API-Key": KEY},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}


def rest_tensor(name: str, x: np.ndarray) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}


def triton_infer(client: triton.InferenceServerClient, model: str, x: np.ndarray, **kw: Any) -> Any:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], headers=AUTH, **kw)


def metrics(server: Server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


# ---------------------------------------------------------------------------------------------- health, metadata
def test_the_log_names_the_grpc_port(server: Server) -> None:
    port = server.grpc.rsplit(":", 1)[1]  # type: ignore[attr-defined]
    assert f"inference.GRPCInferenceService) on 127.0.0.1:{port}" in server.log()


def test_health_and_readiness_with_tritonclient(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tabular-mlp-onnx") and client.is_model_ready("tabular-mlp-onnx", "1")
    assert not client.is_model_ready("tabular-mlp-onnx", "7")  # not the loaded version
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata(as_json=True) == {
        "name": "ferry",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data"],
    }


@pytest.mark.parametrize("model", ["tabular-mlp-onnx", "image-cnn"])
def test_model_metadata_is_rest_s(client: triton.InferenceServerClient, server: Server, model: str) -> None:
    rest = httpx.get(f"{server.url}/v2/models/{model}", timeout=10).json()
    got = client.get_model_metadata(model, as_json=True)
    for tensor in got["inputs"] + got["outputs"]:
        tensor["shape"] = [int(d) for d in tensor["shape"]]  # int64 travels as a JSON string
    assert got == rest


def test_metadata_of_an_unknown_model_is_not_found(client: triton.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.get_model_metadata("nope")
    assert error.value.status() == "StatusCode.NOT_FOUND" and "'nope'" in error.value.message()


# ------------------------------------------------------------------------------------------------------ inference
def test_tabular_64_rows_raw_with_tritonclient_equals_rest(
    client: triton.InferenceServerClient, server: Server
) -> None:
    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    result = triton_infer(client, "tabular-mlp-onnx", x, request_id="r-1")
    got = result.as_numpy("output")
    want = rest_infer(server, "tabular-mlp-onnx", [rest_tensor("input", x)])["output"]
    assert got.dtype == np.float32 and got.shape == (64, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("tabular-mlp-onnx", "1", "r-1")
    assert len(response.raw_output_contents) == 1  # raw in, raw out: as Triton answers


def test_one_image_with_tritonclient_equals_rest(
    client: triton.InferenceServerClient, server: Server
) -> None:
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    got = triton_infer(client, "image-cnn", x).as_numpy("output")
    want = rest_infer(server, "image-cnn", [rest_tensor("input", x)])["output"]
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def typed_request(model: str, x: np.ndarray, **kw: Any) -> Any:
    request = messages.ModelInferRequest(model_name=model, **kw)
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def test_typed_contents_with_plain_stubs_are_answered_typed(channel: grpc.Channel, server: Server) -> None:
    x = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    response = rpc(channel, "ModelInfer", typed_request("tabular-mlp-onnx", x, id="typed"))
    [output] = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("output", "FP32", [5, 10])
    assert not response.raw_output_contents and response.id == "typed"
    got = np.asarray(output.contents.fp32_contents, dtype=np.float32).reshape(5, 10)
    want = rest_infer(server, "tabular-mlp-onnx", [rest_tensor("input", x)])["output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_binary_output_asked_with_typed_inputs_is_raw(channel: grpc.Channel) -> None:
    x = np.ones((2, 64), dtype=np.float32)
    request = typed_request("tabular-mlp-onnx", x)
    request.parameters["binary_data_output"].bool_param = True
    response = rpc(channel, "ModelInfer", request)
    [raw] = response.raw_output_contents
    assert not response.outputs[0].HasField("contents")
    typed = rpc(channel, "ModelInfer", typed_request("tabular-mlp-onnx", x)).outputs[0].contents.fp32_contents
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4"), np.asarray(typed, dtype=np.float32))


# --------------------------------------------------------------------------------------------------------- errors
def expect(code: grpc.StatusCode, *words: str, **call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        rpc(**call)
    assert error.value.code() == code, error.value.details()
    for word in words:
        assert word in error.value.details(), error.value.details()
    return error.value


def test_an_unknown_model_is_not_found(channel: grpc.Channel) -> None:
    expect(
        grpc.StatusCode.NOT_FOUND,
        "'nope'",
        channel=channel,
        method="ModelInfer",
        request=typed_request("nope", np.ones((1, 64), np.float32)),
    )


@pytest.mark.parametrize(
    ("shape", "datatype", "field", "words"),
    [
        ((2, 63), "FP32", "fp32_contents", ["'input'", "63"]),
        ((2, 64), "FP32", "fp64_contents", ["'input'", "fp32_contents"]),
        ((2, 64), "BYTES", "bytes_contents", ["'input'"]),
        ((2, 64), "FP32", None, ["'input'", "neither contents nor raw_input_contents"]),
    ],
    ids=["wrong-shape", "wrong-contents-field", "wrong-datatype", "no-contents"],
)
def test_bad_inputs_are_invalid_argument_naming_the_input(
    channel: grpc.Channel, shape: tuple[int, int], datatype: str, field: str | None, words: list[str]
) -> None:
    request = messages.ModelInferRequest(model_name="tabular-mlp-onnx")
    tensor = request.inputs.add(name="input", datatype=datatype, shape=shape)
    count = shape[0] * shape[1]
    if field == "bytes_contents":
        tensor.contents.bytes_contents.extend([b"1"] * count)
    elif field is not None:
        getattr(tensor.contents, field).extend([1.0] * count)
    expect(grpc.StatusCode.INVALID_ARGUMENT, *words, channel=channel, method="ModelInfer", request=request)


def test_a_raw_input_of_the_wrong_size_is_invalid_argument(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 64), np.float32))
    tensor._raw_content = tensor._raw_content[:-4]  # one value short
    with pytest.raises(InferenceServerException) as error:
        client.infer("tabular-mlp-onnx", [tensor], headers=AUTH)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'input'" in error.value.message() and "raw_input_contents" in error.value.message()


def test_a_missing_input_is_invalid_argument_naming_it(channel: grpc.Channel) -> None:
    request = typed_request("tabular-mlp-onnx", np.ones((1, 64), np.float32))
    request.inputs[0].name = "features"
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "'features'",
        "['input']",
        channel=channel,
        method="ModelInfer",
        request=request,
    )


def test_raw_for_some_inputs_only_is_invalid_argument(channel: grpc.Channel) -> None:
    request = typed_request("tabular-mlp-onnx", np.ones((1, 64), np.float32))
    request.raw_input_contents.extend([b"\0" * 256, b"\0" * 256])
    expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents has 2 entries",
        channel=channel,
        method="ModelInfer",
        request=request,
    )


@pytest.mark.parametrize(
    "metadata",
    [(), (("x-api-key", "wrong"),), (("authorization", "Bearer wrong"),), (("authorization", KEY),)],
    ids=["none", "wrong-x-api-key", "wrong-bearer", "no-scheme"],
)
def test_a_missing_or_wrong_api_key_is_unauthenticated(channel: grpc.Channel, metadata: Any) -> None:
    error = expect(
        grpc.StatusCode.UNAUTHENTICATED,
        "missing or invalid credentials",
        channel=channel,
        method="ModelInfer",
        request=typed_request("tabular-mlp-onnx", np.ones((1, 64), np.float32)),
        metadata=metadata,
    )
    assert KEY not in error.details()


def test_the_bearer_key_is_taken_too(channel: grpc.Channel) -> None:
    request = typed_request("tabular-mlp-onnx", np.ones((1, 64), np.float32))
    assert rpc(channel, "ModelInfer", request, metadata=tuple(AUTH.items())).outputs[0].name == "output"


def test_a_message_above_the_body_limit_is_resource_exhausted(channel: grpc.Channel) -> None:
    x = np.ones((MAX_BODY // 256 + 1, 64), np.float32)  # just over FERRY_LIMITS__MAX_BODY_BYTES
    request = messages.ModelInferRequest(model_name="tabular-mlp-onnx")
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    expect(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
        channel=channel,
        method="ModelInfer",
        request=request,
    )


def gated_request(gate: Path) -> Any:
    request = typed_request("gated", np.ones((1, 3), np.float32))
    request.inputs[0].shape[:] = [1, 3]
    request.parameters["gate"].string_param = str(gate)
    return request


def test_the_client_s_deadline_ends_the_call(channel: grpc.Channel, tmp_path: Path) -> None:
    """The model is held at a gate; the client's 1 s deadline comes long before Ferry's 5 s."""
    try:
        expect(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            channel=channel,
            method="ModelInfer",
            request=gated_request(tmp_path / "gate"),
            timeout=1.0,
        )
    finally:
        (tmp_path / "gate").touch()


def test_ferry_s_deadline_ends_a_call_whose_client_waits_longer(
    channel: grpc.Channel, server: Server, tmp_path: Path
) -> None:
    before = metric(metrics(server), "ferry_requests_rejected_total", model="gated", reason="timeout")
    try:
        expect(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"no result within the {TIMEOUT_MS} ms deadline",
            channel=channel,
            method="ModelInfer",
            request=gated_request(tmp_path / "gate"),
            timeout=60.0,
        )
    finally:
        (tmp_path / "gate").touch()
    after = metric(metrics(server), "ferry_requests_rejected_total", model="gated", reason="timeout")
    assert after == before + 1


# -------------------------------------------------------------------------------------------------------- metrics
def test_grpc_calls_are_counted(channel: grpc.Channel, server: Server) -> None:
    labels = {"model": "tabular-mlp-onnx", "protocol": "grpc"}
    text = metrics(server)
    answered = metric(text, "ferry_inference_requests_total", **labels)
    rows = metric(text, "ferry_inference_rows_total", **labels)
    ok = metric(text, "ferry_grpc_requests_total", method="ModelInfer", code="OK")
    invalid = metric(text, "ferry_grpc_requests_total", method="ModelInfer", code="INVALID_ARGUMENT")
    rejected = metric(text, "ferry_requests_rejected_total", model="tabular-mlp-onnx", reason="invalid_input")
    rpc(channel, "ModelInfer", typed_request("tabular-mlp-onnx", np.ones((3, 64), np.float32)))
    bad = typed_request("tabular-mlp-onnx", np.ones((3, 63), np.float32))
    with pytest.raises(grpc.RpcError):
        rpc(channel, "ModelInfer", bad)
    text = metrics(server)
    assert metric(text, "ferry_inference_requests_total", **labels) == answered + 1
    assert metric(text, "ferry_inference_rows_total", **labels) == rows + 3
    assert metric(text, "ferry_grpc_requests_total", method="ModelInfer", code="OK") == ok + 1
    assert (
        metric(text, "ferry_grpc_requests_total", method="ModelInfer", code="INVALID_ARGUMENT") == invalid + 1
    )
    assert (
        metric(text, "ferry_requests_rejected_total", model="tabular-mlp-onnx", reason="invalid_input")
        == rejected + 1
    )


# ------------------------------------------------------------------------------------------------------- shutdown
def test_sigterm_drains_a_call_in_flight(models: Registry, tmp_path: Path) -> None:
    """A Ferry of its own: a call held by the model when SIGTERM arrives, and still held when the server
    stops taking calls, is answered; the process exits 0."""
    port = free_port()
    env = {"FERRY_GRPC_PORT": str(port), "FERRY_SHUTDOWN__GRACE_S": "1"}
    server = start_server(models, "gated=models:/gated@champion", tmp_path, env)
    gate, log = tmp_path / "gate", tmp_path / "calls"
    request = gated_request(gate)
    request.parameters["log"].string_param = str(log)
    answers: dict[str, Any] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            holder = threading.Thread(
                target=lambda: answers.update(r=rpc(channel, "ModelInfer", request, ()))
            )
            holder.start()
            assert wait_until(lambda: log.exists(), timeout_s=30, interval_s=0.02), "the model never took it"
            server.process.send_signal(signal.SIGTERM)
            # The gate opens once the lifespan shuts down (gRPC's stop is its first step): the call is
            # still in flight when the server stops taking calls, and is answered all the same.
            shutting = "Waiting for application shutdown"
            assert wait_until(lambda: shutting in server.log(), timeout_s=30, interval_s=0.01), server.log()
            gate.touch()
            holder.join(60)
        assert answers["r"].outputs[0].name and list(answers["r"].outputs[0].shape) == [1, 3]
        assert server.process.wait(60) == 0
    finally:
        gate.touch()
        stop_server(server)
