"""The Open Inference Protocol's model repository extension (issue 16) on a real Ferry and a real MLflow
registry: the index, load (by name, or from a URI) and unload, over plain HTTP and through
``tritonclient.http`` as KServe's and Seldon's agents and Triton's users call it, behind the admin
token (401 without it, 404 when Ferry has no admin token: the routes do not exist)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from mlflow_stores import save_linear

from conftest import Registry, Server, metric, start_server, stop_server

pytestmark = pytest.mark.integration

TOKEN = "repository-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = "linear-onnx=models:/linear-onnx@champion,mlp=models:/tabular-mlp-onnx@champion"
ROWS = [[1.0, 2.0, 3.0, 4.0]]


@pytest.fixture(scope="module")
def server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repository = tmp_path_factory.mktemp("model-repository")
    save_linear(repository / "downloaded", 2.0)  # what KServe's model agent leaves in /mnt/models/NAME
    (repository / "empty").mkdir()
    env = {
        "FERRY_ADMIN_TOKEN": TOKEN,
        "FERRY_RELOAD__POLL_S": "0",
        "FERRY_MODEL_REPOSITORY": str(repository),
    }
    served = start_server(registry, MODELS, tmp_path_factory.mktemp("repository"), env)
    yield served
    stop_server(served)


def post(
    server: Server, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    content = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return httpx.post(
        f"{server.url}{path}", content=content, headers=AUTH if headers is None else headers, timeout=120
    )


def index(server: Server, body: Any = None) -> dict[str, dict[str, Any]]:
    answer = post(server, "/v2/repository/index", body)
    assert answer.status_code == 200, answer.text
    return {entry["name"]: entry for entry in answer.json()}


def counted(server: Server, name: str, **labels: str) -> float:
    return metric(httpx.get(f"{server.url}/metrics", timeout=10).text, name, **labels)


def infer(server: Server, name: str) -> httpx.Response:
    return httpx.post(f"{server.url}/models/{name}/predict", json={"inputs": ROWS}, timeout=60)


def test_the_index_lists_every_model_with_its_state_as_triton_spells_it(server: Server) -> None:
    listed = index(server)
    assert listed == {
        "linear-onnx": {"name": "linear-onnx", "version": "1", "state": "READY", "reason": ""},
        "mlp": {"name": "mlp", "version": "1", "state": "READY", "reason": ""},
    }
    assert index(server, {"ready": True}) == listed
    assert index(server, {}) == listed
    bad = post(server, "/v2/repository/index", {"ready": "yes"})
    assert bad.status_code == 400 and "'ready'" in bad.json()["error"], bad.text
    broken = post(server, "/v2/repository/index", b"{not json")
    assert broken.status_code == 400 and "JSON" in broken.json()["error"], broken.text


@pytest.mark.parametrize(
    "path", ["/v2/repository/index", "/v2/repository/models/mlp/load", "/v2/repository/models/mlp/unload"]
)
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": TOKEN}, {"Authorization": TOKEN}],
    ids=["none", "wrong", "api-key-header", "no-scheme"],
)
def test_without_the_admin_token_every_route_is_401(
    server: Server, path: str, headers: dict[str, str]
) -> None:
    answer = post(server, path, {}, headers)
    assert answer.status_code == 401, answer.text
    assert answer.json() == {"error": "missing or invalid credentials"}
    assert index(server)["mlp"]["state"] == "READY", "nothing was unloaded"


def test_unload_keeps_the_model_listed_unavailable_and_load_brings_it_back(server: Server) -> None:
    unloads = counted(server, "ferry_model_unloads_total", model="mlp", reason="repository")
    loads = counted(server, "ferry_model_loads_total", model="mlp", reason="repository")
    unloaded = post(server, "/v2/repository/models/mlp/unload", {"parameters": {"unload_dependents": False}})
    assert (unloaded.status_code, unloaded.content) == (200, b""), unloaded.text
    assert index(server)["mlp"] == {"name": "mlp", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert "mlp" not in index(server, {"ready": True})
    ready = httpx.get(f"{server.url}/v2/models/mlp/ready", timeout=10)
    assert (ready.status_code, ready.json()) == (503, {"name": "mlp", "ready": False})
    assert httpx.get(f"{server.url}/health/ready", timeout=10).status_code == 200, "unloaded on purpose"
    refused = httpx.post(f"{server.url}/models/mlp/predict", json={"inputs": [[0.0] * 64]}, timeout=10)
    assert refused.status_code == 503 and "unloaded" in refused.json()["error"]["message"]
    assert counted(server, "ferry_model_unloads_total", model="mlp", reason="repository") == unloads + 1

    loaded = post(server, "/v2/repository/models/mlp/load", {})
    assert (loaded.status_code, loaded.content) == (200, b""), loaded.text
    assert index(server)["mlp"]["state"] == "READY"
    answer = httpx.post(f"{server.url}/models/mlp/predict", json={"inputs": [[0.0] * 64]}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert counted(server, "ferry_model_loads_total", model="mlp", reason="repository") == loads + 1
    assert "model mlp v1 unloaded (repository API)" in server.log()


def test_load_from_a_uri_serves_a_new_model_and_an_unknown_name_without_one_is_404(server: Server) -> None:
    unknown = post(server, "/v2/repository/models/copy/load", {})
    assert unknown.status_code == 404 and "'copy'" in unknown.json()["error"], unknown.text
    loaded = post(
        server, "/v2/repository/models/copy/load", {"parameters": {"uri": "models:/linear-onnx@champion"}}
    )
    assert loaded.status_code == 200, loaded.text
    assert index(server)["copy"] == {"name": "copy", "version": "1", "state": "READY", "reason": ""}
    answer = infer(server, "copy")
    assert answer.status_code == 200 and answer.json()["outputs"] == [[21.0, 21.0, 21.0]], answer.text


def test_a_load_with_no_body_serves_the_model_repository_folder_of_that_name(server: Server) -> None:
    """KServe's model agent downloads a model to ``/mnt/models/NAME`` and asks for its load with no
    body: ``FERRY_MODEL_REPOSITORY`` says where those folders are."""
    loaded = post(server, "/v2/repository/models/downloaded/load")
    assert loaded.status_code == 200, loaded.text
    assert index(server)["downloaded"]["state"] == "READY"
    answer = infer(server, "downloaded")
    assert answer.status_code == 200 and answer.json()["outputs"] == [[21.0, 21.0, 21.0]], answer.text
    for name in ("empty", "absent"):  # a folder without an MLmodel, and no folder at all
        refused = post(server, f"/v2/repository/models/{name}/load")
        assert refused.status_code == 404, (name, refused.text)
        assert "FERRY_MODEL_REPOSITORY" in refused.json()["error"], refused.text
    assert "empty" not in index(server) and "absent" not in index(server)


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"uri": 5}, "'uri'"),
        ({"uri": " "}, "'uri'"),
        ({"file:1/model.onnx": "AAAA"}, "file:1/model.onnx"),
        ({"URI": "models:/linear-onnx@champion"}, "URI"),
        ({"config": "{not json"}, "'config'"),
        ({"config": '{"backend": "onnxruntime"}'}, "'config'"),
        ("models:/linear-onnx@champion", "'parameters'"),
    ],
)
def test_a_malformed_load_is_400_naming_the_field(server: Server, parameters: Any, named: str) -> None:
    answer = post(server, "/v2/repository/models/other/load", {"parameters": parameters})
    assert answer.status_code == 400, answer.text
    assert named in answer.json()["error"], answer.text
    assert "other" not in index(server)


def test_a_load_that_fails_says_why(server: Server) -> None:
    answer = post(
        server, "/v2/repository/models/ghost/load", {"parameters": {"uri": "models:/no-such-model@champion"}}
    )
    assert answer.status_code == 404, answer.text  # the registry has no such model
    assert "no-such-model" in answer.json()["error"], answer.text
    assert "ghost" not in index(server), "a model that never loaded is not kept"
    assert httpx.get(f"{server.url}/health/ready", timeout=10).status_code == 200
    unload = post(server, "/v2/repository/models/never-served/unload", {})
    assert unload.status_code == 404 and "'never-served'" in unload.json()["error"], unload.text


def test_tritonclient_lists_loads_and_unloads_with_the_token_as_a_header(server: Server) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert "model_repository" in client.get_server_metadata()["extensions"]
        listed = {m["name"]: m for m in client.get_model_repository_index(headers=AUTH)}
        assert listed["linear-onnx"]["state"] == "READY"
        client.unload_model("linear-onnx", headers=AUTH)
        assert not client.is_model_ready("linear-onnx")
        assert {m["name"]: m["state"] for m in client.get_model_repository_index(headers=AUTH)}[
            "linear-onnx"
        ] == "UNAVAILABLE"
        client.load_model("linear-onnx", headers=AUTH)
        assert client.is_model_ready("linear-onnx")
        # A new model from a URI: Triton's ``config`` parameter, a JSON object holding Ferry's ``uri``.
        client.load_model(
            "triton-copy", headers=AUTH, config=json.dumps({"uri": "models:/linear-onnx@champion"})
        )
        assert client.is_model_ready("triton-copy")
        inputs = triton.InferInput("input", [1, 4], "FP32")
        inputs.set_data_from_numpy(np.array(ROWS, dtype=np.float32))
        result = client.infer("triton-copy", [inputs])
        assert result.as_numpy("output").tolist() == [[21.0, 21.0, 21.0]]
        with pytest.raises(InferenceServerException) as refused:
            client.unload_model("triton-copy")
        assert refused.value.status() == "401"
        with pytest.raises(InferenceServerException) as unknown:
            client.load_model("nobody-knows", headers=AUTH)
        assert unknown.value.status() == "404" and "nobody-knows" in unknown.value.message()
    finally:
        client.close()


def test_without_an_admin_token_the_routes_do_not_exist(ferry_server: Server) -> None:
    metadata = httpx.get(f"{ferry_server.url}/v2", timeout=10).json()
    assert "model_repository" not in metadata["extensions"]
    for path in ("/v2/repository/index", "/v2/repository/models/linear/load"):
        answer = httpx.post(f"{ferry_server.url}{path}", json={}, headers=AUTH, timeout=10)
        assert answer.status_code == 404, answer.text
        assert "error" in answer.json()
