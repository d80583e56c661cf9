"""MLflow's scoring protocol against the real server: MLflow's own payloads (the serving input example it
writes with each model, and each JSON form) answered exactly as MLflow's scoring code answers them, MLflow's
own client, CSV, bad input in MLflow's error shape, and readiness in every protocol."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import Registry, Server, metric, start_server, stop_server

pytestmark = pytest.mark.integration

ROWS = [[1, 2, 3, 4], [0.5, 0, 0, 0], [-1, -1, 0, 2.25]]
MODELS = ["linear", "linear-onnx", "tabular-mlp-onnx"]


@pytest.fixture(scope="module")
def pyfunc(registry: Registry) -> dict[str, Any]:
    """Each served model loaded by MLflow itself, with its artifact folder."""
    import mlflow

    return {
        name: (
            mlflow.pyfunc.load_model(f"models:/{name}/1"),
            Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1")),
        )
        for name in MODELS
    }


def mlflow_answer(model: Any, payload: dict[str, Any]) -> Any:
    """What ``mlflow models serve`` answers: MLflow's own scoring function, in process."""
    from mlflow.pyfunc import scoring_server

    schema = model.metadata.get_input_schema()
    result = scoring_server.invocations(json.dumps(payload), "application/json", model, schema)
    assert result.status == 200, result.response
    return json.loads(result.response)


def assert_same(got: Any, want: Any) -> None:
    """Same structure (list vs {output: list}), same keys, values equal as float32."""
    assert type(got) is type(want), (got, want)
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same(got[key], want[key])
    else:
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6, atol=1e-6
        )


def test_serving_input_example_is_answered_like_mlflow(ferry_server: Server, pyfunc: dict[str, Any]) -> None:
    for name, (model, path) in pyfunc.items():
        example = json.loads((path / "serving_input_example.json").read_text())
        r = httpx.post(f"{ferry_server.url}/models/{name}/invocations", json=example)
        assert r.status_code == 200, r.text
        assert_same(r.json(), mlflow_answer(model, example))


FORMS: dict[str, list[dict[str, Any]]] = {
    # the forms MLflow's own server accepts for each model (for an unnamed tensor input, any column names)
    "linear": [
        {"inputs": ROWS},
        {"inputs": ROWS, "params": {"note": "x"}},
        {"instances": ROWS},
        {"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": ROWS}},
        {"dataframe_split": {"data": ROWS, "index": [7, 8, 9]}},
        {"dataframe_records": [dict(zip("abcd", row, strict=True)) for row in ROWS]},
    ],
    "linear-onnx": [
        {"inputs": ROWS},
        {"inputs": {"input": ROWS}},
        {"instances": ROWS},
        {"instances": [{"input": row} for row in ROWS]},
        {"dataframe_split": {"columns": ["input"], "data": [[row] for row in ROWS]}},
        {"dataframe_records": [{"input": row} for row in ROWS]},
    ],
}


@pytest.mark.parametrize(
    ("name", "payload"),
    [(name, payload) for name, forms in FORMS.items() for payload in forms],
    ids=[f"{name}-{next(iter(p))}-{i}" for name, forms in FORMS.items() for i, p in enumerate(forms)],
)
def test_every_json_form_matches_mlflow(
    ferry_server: Server, pyfunc: dict[str, Any], name: str, payload: dict[str, Any]
) -> None:
    r = httpx.post(f"{ferry_server.url}/models/{name}/invocations", json=payload)
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "1"
    assert_same(r.json(), mlflow_answer(pyfunc[name][0], payload))


def test_mlp_matches_pyfunc_predict(ferry_server: Server, pyfunc: dict[str, Any]) -> None:
    x = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    want = pyfunc["tabular-mlp-onnx"][0].predict({"input": x})
    r = httpx.post(
        f"{ferry_server.url}/models/tabular-mlp-onnx/invocations", json={"inputs": {"input": x.tolist()}}
    )
    assert r.status_code == 200, r.text
    assert_same(r.json(), {"predictions": {k: v.tolist() for k, v in want.items()}})


def test_csv_matches_pyfunc_predict(ferry_server: Server, pyfunc: dict[str, Any]) -> None:
    x = np.asarray(ROWS, dtype=np.float32)
    for body in (
        "a,b,c,d\n" + "\n".join(",".join(str(v) for v in row) for row in ROWS),
        "1,2,3,4\n0.5,0,0,0\n-1,-1,0,2.25",
    ):
        r = httpx.post(f"{ferry_server.url}/invocations", content=body, headers={"Content-Type": "text/csv"})
        assert r.status_code == 200, r.text
        assert_same(r.json(), {"predictions": pyfunc["linear"][0].predict(x).tolist()})


def test_invocations_serves_the_default_model(ferry_server: Server) -> None:
    r = httpx.post(f"{ferry_server.url}/invocations", json={"inputs": [[1, 1, 1, 1]]})
    assert r.status_code == 200 and r.json() == {"predictions": [[9.0, 9.0, 9.0]]}
    assert r.headers["X-Model-Version"] == "1"


def test_mlflows_own_client(ferry_server: Server) -> None:
    import mlflow
    import pandas as pd
    from mlflow.pyfunc.scoring_server.client import ScoringServerClient

    host, port = ferry_server.url.removeprefix("http://").split(":")
    client = ScoringServerClient(host, int(port))
    client.ping()
    assert client.get_version() == mlflow.__version__
    x = np.asarray(ROWS, dtype=np.float32)
    assert_same(client.invoke(x)["predictions"], (2 * x.sum(1, keepdims=True) + 1).repeat(3, 1).tolist())
    frame = pd.DataFrame(x, columns=list("abcd"))
    assert_same(client.invoke(frame)["predictions"], client.invoke(x)["predictions"])


def test_ping_health_version(ferry_server: Server) -> None:
    import mlflow

    for path in ("/ping", "/health"):
        r = httpx.get(f"{ferry_server.url}{path}")
        assert r.status_code == 200 and r.text == "\n"
    assert httpx.get(f"{ferry_server.url}/version").text == mlflow.__version__


BAD: list[tuple[str, str, Any, str, int, str, str]] = [
    ("wrong datatype", "linear", {"inputs": [["a", "b", "c", "d"]]}, "application/json", 400,
     "INVALID_PARAMETER_VALUE", "input 'input': expected float32 values, got strings"),
    ("shape", "linear", {"inputs": [[1, 2, 3]]}, "application/json", 400, "INVALID_PARAMETER_VALUE",
     "expected shape [-1, 4] (rows first), got [1, 3]"),
    ("unknown input", "linear-onnx", {"inputs": {"x": ROWS}}, "application/json", 400, "INVALID_PARAMETER_VALUE",
     "unknown input(s) ['x']; the model takes ['input']"),
    ("split columns vs data", "linear", {"dataframe_split": {"columns": ["a", "b"], "data": ROWS}},
     "application/json", 400, "INVALID_PARAMETER_VALUE", "row 0 has 4 values for 2 columns"),
    ("two forms", "linear", {"inputs": ROWS, "instances": ROWS}, "application/json", 400, "BAD_REQUEST",
     "exactly one of"),
    ("no form", "linear", {"data": ROWS}, "application/json", 400, "BAD_REQUEST", "it holds ['data']"),
    ("params not an object", "linear", {"inputs": ROWS, "params": [1]}, "application/json", 400,
     "INVALID_PARAMETER_VALUE", "'params' must be an object"),
    ("not json", "linear", b'{"inputs": [[1, 2, 3, 4]]', "application/json", 400, "BAD_REQUEST", "not valid JSON"),
    ("malformed csv", "linear", b'a,b,c,d\n1,2,3,"4\n', "text/csv", 400, "BAD_REQUEST", "malformed CSV"),
    ("ragged csv", "linear", b"1,2,3,4\n1,2\n", "text/csv", 400, "BAD_REQUEST", "data row 2 has 2 fields"),
    ("csv not numbers", "linear", b"a,b,c,d\n1,2,three,4\n", "text/csv", 400, "INVALID_PARAMETER_VALUE",
     "not a number: 'three'"),
    ("csv feature count", "linear", b"1,2,3\n", "text/csv", 400, "INVALID_PARAMETER_VALUE", "got [1, 3]"),
    ("media type", "linear", b"x", "application/vnd.apache.parquet", 415, "BAD_REQUEST", "not supported"),
    ("charset", "linear", b"{}", "application/json; charset=latin-1", 415, "BAD_REQUEST", "in UTF-8"),
    ("unknown model", "nope", {"inputs": ROWS}, "application/json", 404, "RESOURCE_DOES_NOT_EXIST",
     "'nope' is not served"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "model", "body", "content_type", "status", "code", "fragment"), BAD, ids=[c[0] for c in BAD]
)
def test_bad_input_gets_mlflows_error(
    ferry_server: Server,
    case: str,
    model: str,
    body: Any,
    content_type: str,
    status: int,
    code: str,
    fragment: str,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        f"{ferry_server.url}/models/{model}/invocations",
        content=content,
        headers={"Content-Type": content_type},
    )
    assert r.status_code == status, r.text
    error = r.json()
    assert set(error) == {"error_code", "message"} and error["error_code"] == code, error
    assert fragment in error["message"], error


def test_requests_are_counted_under_the_mlflow_protocol(ferry_server: Server) -> None:
    def count() -> float:
        text = httpx.get(f"{ferry_server.url}/metrics").text
        return metric(text, "ferry_inference_requests_total", protocol="mlflow")

    before = count()
    assert httpx.post(f"{ferry_server.url}/invocations", json={"inputs": ROWS}).status_code == 200
    assert count() - before == 1


@pytest.fixture(scope="module")
def degraded_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A Ferry with one good model and one that cannot load."""
    server = start_server(
        registry,
        "linear=models:/linear@champion,broken=models:/no-such-model@champion",
        tmp_path_factory.mktemp("degraded"),
        wait_ready=False,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            models = httpx.get(f"{server.url}/health/ready", timeout=2).json().get("models", {})
        except httpx.TransportError:
            models = {}
        if models and "loading" not in models.values():
            break
        time.sleep(0.2)
    yield server
    stop_server(server)


def test_not_ready_in_every_protocol(degraded_server: Server) -> None:
    url = degraded_server.url
    for path in ("/ping", "/health"):
        r = httpx.get(f"{url}{path}")
        assert r.status_code == 503 and r.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert "'broken': 'failed'" in r.json()["message"] and r.headers["Retry-After"]
    assert httpx.get(f"{url}/v2/health/ready").status_code == 503
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
    r = httpx.get(f"{url}/v2/models/broken/ready")
    assert r.status_code == 503 and r.json() == {"name": "broken", "ready": False}
    r = httpx.get(f"{url}/v2/models/broken")
    assert r.status_code == 503 and list(r.json()) == ["error"] and "failed" in r.json()["error"]
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    r = httpx.post(f"{url}/v2/models/broken/infer", json=body)
    assert r.status_code == 503 and list(r.json()) == ["error"]
    r = httpx.post(f"{url}/models/broken/invocations", json={"inputs": ROWS})
    assert r.status_code == 503 and r.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    # the good model still answers in both protocols
    assert httpx.post(f"{url}/invocations", json={"inputs": [[1, 1, 1, 1]]}).json() == {
        "predictions": [[9.0] * 3]
    }
    assert httpx.post(f"{url}/v2/models/linear/infer", json=body).status_code == 200
