"""Record Ferry's golden responses: a fixed list of requests over the three protocols (Ferry's
``/predict``, the Open Inference Protocol ``/v2``, MLflow's ``/invocations``), each sent in order to a real
Ferry (uvicorn) serving a freshly built, deterministic registry, and every answer's status, exact body
and client-visible headers written to ``tests/golden/responses.json``.

``tests/integration/test_golden.py`` replays the same requests against the current code and asserts the
same answers: what clients see must not change while the request pipeline is redesigned (issue 12).

Record from the code *before* a change, in a frozen copy of it::

    git worktree add /tmp/golden-old <commit>
    PYTHONPATH=/tmp/golden-old .venv/bin/python tests/golden/record.py

The servers run ``python -m service`` in a temporary folder, so ``PYTHONPATH`` decides which ``service``
package answers (it comes before the editable install); the recording names it in ``meta``. Add a request
by appending to ``exchanges()`` (never in the middle: later answers depend on the cache state earlier
requests leave) and record again from the old code.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
from conftest import (  # noqa: E402
    DEFAULT_MODELS,
    Registry,
    build_registry,
    register_code_model,
    start_server,
    stop_server,
)

GOLDEN = Path(__file__).resolve().parent / "responses.json"
KEY, OTHER_KEY, ADMIN = "golden-key", "golden-other-key", "golden-admin-token"
MAX_ROWS, MAX_BODY_BYTES = 8, 8192
SERVERS: dict[str, tuple[str, dict[str, str]]] = {
    # name: (FERRY_MODELS, extra environment)
    "open": (
        DEFAULT_MODELS + ",scaler=models:/scaler@champion",
        {
            "FERRY_DEVICE": "cpu",
            "FERRY_LIMITS__MAX_ROWS": str(MAX_ROWS),
            "FERRY_LIMITS__MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        },
    ),
    "keys": (
        "linear=models:/linear@champion",
        {"FERRY_DEVICE": "cpu", "FERRY_API_KEYS": f"{OTHER_KEY},{KEY}", "FERRY_ADMIN_TOKEN": ADMIN},
    ),
}
"""The server configurations requests are sent to, each started once, in this order."""
HEADERS = (
    "content-type",
    "content-length",
    "x-model-version",
    "x-cache",
    "retry-after",
    "www-authenticate",
    "inference-header-content-length",
    "allow",
)
"""The response headers compared (lower case); the others (date, server) vary or are uvicorn's."""
SCALER_EXAMPLE = np.arange(6, dtype=np.float32).reshape(2, 3)


def build(root: Path) -> Registry:
    """The golden registry under ``root``: conftest's models, then the ``scaler`` pyfunc (takes
    ``params``), always registered in this order so that every version number is the same."""
    import mlflow

    registry = build_registry(root)
    experiment = mlflow.get_experiment_by_name("tests")  # its artifacts under root, not ./mlruns
    assert experiment is not None
    code = TESTS / "integration" / "scaler_model.py"
    register_code_model(registry, "scaler", code, SCALER_EXAMPLE, {"scale": 1.0}, experiment.experiment_id)
    return registry


# ------------------------------------------------------------------------------------------- requests
def _request(
    server: str,
    name: str,
    method: str,
    path: str,
    body: bytes | str | None = None,
    *,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
) -> dict[str, Any]:
    """One request as stored; ``chunked``: sent without Content-Length, in 4 KB chunks."""
    headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body, separators=(",", ":"))
        headers.setdefault("Content-Type", "application/json")
    entry: dict[str, Any] = {"server": server, "name": name, "method": method, "path": path}
    entry["headers"] = headers
    if isinstance(body, str):
        entry["body_text"] = body
    elif body is not None:
        entry["body_b64"] = base64.b64encode(body).decode()
    if chunked:
        entry["chunked"] = True
    return entry


def request_body(request: dict[str, Any]) -> bytes | None:
    if "body_text" in request:
        return str(request["body_text"]).encode()
    if "body_b64" in request:
        return base64.b64decode(request["body_b64"])
    return None


def _mlp_rows(rows: int, seed: int) -> list[list[float]]:
    """``rows`` x 64 features rounded to 4 decimals (exact JSON text, as a client would send)."""
    return np.random.default_rng(seed).standard_normal((rows, 64)).round(4).tolist()


def _v2_binary(rows: int, seed: int, binary_output: bool) -> tuple[bytes, dict[str, str]]:
    """A v2 request for ``tabular-mlp-onnx`` with the input as raw float32 (binary tensor extension)."""
    data = np.random.default_rng(seed).standard_normal((rows, 64)).astype("<f4").tobytes()
    header: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": [rows, 64],
                "datatype": "FP32",
                "parameters": {"binary_data_size": len(data)},
            }
        ]
    }
    if binary_output:
        header["parameters"] = {"binary_data_output": True}
    text = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(text))}
    return text + data, headers


def _v2_tensor(data: Any, shape: list[int], datatype: str = "FP32", name: str = "input") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def exchanges() -> list[dict[str, Any]]:
    """Every request, in the order sent (requests to one server keep their relative order)."""
    # fmt: off
    out: list[dict[str, Any]] = []
    add = out.append
    row = [[1, 2, 3, 4]]
    rows3 = [[1, 2, 3, 4], [0.5, 0, 0, 0], [-1, -1, 0, 2.25]]
    one = {"model": "linear", "inputs": row}

    # -- Ferry's protocol ----------------------------------------------------------------------------
    add(_request("open", "predict-linear", "POST", "/predict", json_body=one))
    add(_request("open", "predict-linear-repeat", "POST", "/predict", json_body=one))
    add(_request("open", "predict-no-cache", "POST", "/predict", json_body=one, headers={"Cache-Control": "no-cache"}))
    add(_request("open", "predict-no-store", "POST", "/predict", json_body=one, headers={"Cache-Control": "no-store"}))
    add(_request("open", "predict-multirow", "POST", "/predict", json_body={"model": "linear", "inputs": rows3}))
    add(_request("open", "predict-default-model", "POST", "/predict", json_body={"inputs": [[0, 0, 0, 1]]}))
    add(_request("open", "predict-path-onnx-named", "POST", "/models/linear-onnx/predict", json_body={"inputs": {"input": [[1, 1, 1, 1]]}}))
    add(_request("open", "predict-path-onnx-rows", "POST", "/models/linear-onnx/predict", json_body={"inputs": rows3}))
    add(_request("open", "predict-mlp-3rows", "POST", "/models/tabular-mlp-onnx/predict", json_body={"inputs": _mlp_rows(3, 11)}))
    add(_request("open", "predict-mlp-3rows-repeat", "POST", "/models/tabular-mlp-onnx/predict", json_body={"inputs": _mlp_rows(3, 11)}))
    add(_request("open", "predict-scaler-params", "POST", "/models/scaler/predict", json_body={"inputs": SCALER_EXAMPLE.tolist(), "params": {"scale": 3.0}}))
    add(_request("open", "predict-scaler-default-params", "POST", "/predict", json_body={"model": "scaler", "inputs": SCALER_EXAMPLE.tolist()}))
    add(_request("open", "predict-scaler-bad-param", "POST", "/predict", json_body={"model": "scaler", "inputs": SCALER_EXAMPLE.tolist(), "params": {"scale": "three"}}))
    add(_request("open", "predict-params-not-object", "POST", "/predict", json_body={"model": "linear", "inputs": row, "params": [1]}))
    add(_request("open", "predict-malformed-json", "POST", "/predict", '{"model": "linear", "inputs": [[1,2', headers={"Content-Type": "application/json"}))
    add(_request("open", "predict-not-object", "POST", "/predict", json_body=[[1, 2, 3, 4]]))
    add(_request("open", "predict-missing-inputs", "POST", "/predict", json_body={"model": "linear"}))
    add(_request("open", "predict-wrong-shape", "POST", "/predict", json_body={"model": "linear", "inputs": [[1, 2, 3]]}))
    add(_request("open", "predict-wrong-dtype", "POST", "/predict", json_body={"model": "linear", "inputs": [["a", "b", "c", "d"]]}))
    add(_request("open", "predict-model-not-string", "POST", "/predict", json_body={"model": 7, "inputs": row}))
    add(_request("open", "predict-unknown-model", "POST", "/predict", json_body={"model": "nope", "inputs": row}))
    add(_request("open", "predict-path-unknown-model", "POST", "/models/nope/predict", json_body={"inputs": row}))
    add(_request("open", "predict-path-body-mismatch", "POST", "/models/linear/predict", json_body={"model": "linear-onnx", "inputs": row}))
    add(_request("open", "predict-too-many-rows", "POST", "/predict", json_body={"model": "linear", "inputs": [[1, 2, 3, 4]] * (MAX_ROWS + 1)}))
    # 8 rows (the limit) at full float32 precision: valid in all but its size (about 10 KB)
    big = np.random.default_rng(2).standard_normal((MAX_ROWS, 64)).astype(np.float32).tolist()
    add(_request("open", "predict-body-fits", "POST", "/models/tabular-mlp-onnx/predict", json_body={"inputs": big[:2]}))
    add(_request("open", "predict-body-too-large", "POST", "/models/tabular-mlp-onnx/predict", json_body={"inputs": big}))
    add(_request("open", "predict-body-too-large-chunked", "POST", "/models/tabular-mlp-onnx/predict", json_body={"inputs": big}, chunked=True))

    # -- Open Inference Protocol v2 ------------------------------------------------------------------
    add(_request("open", "v2-server-metadata", "GET", "/v2"))
    add(_request("open", "v2-health-live", "GET", "/v2/health/live"))
    add(_request("open", "v2-health-ready", "GET", "/v2/health/ready"))
    add(_request("open", "v2-model-metadata-torch", "GET", "/v2/models/linear"))
    add(_request("open", "v2-model-metadata-onnx", "GET", "/v2/models/linear-onnx"))
    add(_request("open", "v2-model-metadata-mlp", "GET", "/v2/models/tabular-mlp-onnx"))
    add(_request("open", "v2-version-metadata", "GET", "/v2/models/linear/versions/1"))
    add(_request("open", "v2-version-metadata-unknown", "GET", "/v2/models/linear/versions/2"))
    add(_request("open", "v2-model-metadata-unknown", "GET", "/v2/models/nope"))
    add(_request("open", "v2-model-ready", "GET", "/v2/models/linear/ready"))
    add(_request("open", "v2-version-ready", "GET", "/v2/models/linear/versions/1/ready"))
    add(_request("open", "v2-version-ready-unknown", "GET", "/v2/models/linear/versions/2/ready"))
    infer_one = {"inputs": [_v2_tensor([1, 2, 3, 4], [1, 4])]}
    add(_request("open", "v2-infer-json", "POST", "/v2/models/linear/infer", json_body=infer_one))
    add(_request("open", "v2-infer-json-repeat", "POST", "/v2/models/linear/infer", json_body=infer_one))
    add(_request("open", "v2-infer-json-no-cache", "POST", "/v2/models/linear/infer", json_body=infer_one, headers={"Cache-Control": "no-cache"}))
    add(_request("open", "v2-infer-id-outputs", "POST", "/v2/models/linear-onnx/infer", json_body={"id": "req-1", "inputs": [_v2_tensor([v for r in rows3 for v in r], [3, 4])], "outputs": [{"name": "output"}]}))
    add(_request("open", "v2-infer-version", "POST", "/v2/models/linear-onnx/versions/1/infer", json_body={"inputs": [_v2_tensor([1, 1, 1, 1, 2, 2, 2, 2], [2, 4])]}))
    add(_request("open", "v2-infer-version-unknown", "POST", "/v2/models/linear/versions/2/infer", json_body=infer_one))
    add(_request("open", "v2-infer-binary-output-param", "POST", "/v2/models/linear-onnx/infer", json_body={"inputs": [_v2_tensor([1, 2, 3, 4], [1, 4])], "parameters": {"binary_data_output": True}}))
    add(_request("open", "v2-infer-binary-output-selected", "POST", "/v2/models/linear-onnx/infer", json_body={"inputs": [_v2_tensor([1, 2, 3, 4], [1, 4])], "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}))
    body, headers = _v2_binary(4, 5, binary_output=True)
    add(_request("open", "v2-infer-binary-in-out", "POST", "/v2/models/tabular-mlp-onnx/infer", body, headers=headers))
    add(_request("open", "v2-infer-binary-in-out-repeat", "POST", "/v2/models/tabular-mlp-onnx/infer", body, headers=headers))
    body, headers = _v2_binary(2, 6, binary_output=False)
    add(_request("open", "v2-infer-binary-in-json-out", "POST", "/v2/models/tabular-mlp-onnx/infer", body, headers=headers))
    add(_request("open", "v2-infer-binary-bad-header-length", "POST", "/v2/models/tabular-mlp-onnx/infer", body, headers={**headers, "Inference-Header-Content-Length": str(len(body) + 1)}))
    add(_request("open", "v2-infer-binary-header-not-int", "POST", "/v2/models/tabular-mlp-onnx/infer", body, headers={**headers, "Inference-Header-Content-Length": "ten"}))
    add(_request("open", "v2-infer-malformed-json", "POST", "/v2/models/linear/infer", '{"inputs": [', headers={"Content-Type": "application/json"}))
    add(_request("open", "v2-infer-missing-inputs", "POST", "/v2/models/linear/infer", json_body={"id": "x"}))
    add(_request("open", "v2-infer-wrong-shape", "POST", "/v2/models/linear/infer", json_body={"inputs": [_v2_tensor([1, 2, 3], [1, 3])]}))
    add(_request("open", "v2-infer-shape-data-mismatch", "POST", "/v2/models/linear/infer", json_body={"inputs": [_v2_tensor([1, 2, 3], [1, 4])]}))
    add(_request("open", "v2-infer-wrong-dtype", "POST", "/v2/models/linear/infer", json_body={"inputs": [_v2_tensor(["a", "b", "c", "d"], [1, 4], "BYTES")]}))
    add(_request("open", "v2-infer-unknown-input", "POST", "/v2/models/linear-onnx/infer", json_body={"inputs": [_v2_tensor([1, 2, 3, 4], [1, 4], name="x")]}))
    add(_request("open", "v2-infer-unknown-output", "POST", "/v2/models/linear-onnx/infer", json_body={"inputs": [_v2_tensor([1, 2, 3, 4], [1, 4])], "outputs": [{"name": "nope"}]}))
    add(_request("open", "v2-infer-unknown-model", "POST", "/v2/models/nope/infer", json_body=infer_one))
    add(_request("open", "v2-infer-too-many-rows", "POST", "/v2/models/linear/infer", json_body={"inputs": [_v2_tensor([1, 2, 3, 4] * (MAX_ROWS + 1), [MAX_ROWS + 1, 4])]}))

    # -- MLflow's scoring protocol -------------------------------------------------------------------
    add(_request("open", "mlflow-dataframe-split", "POST", "/invocations", json_body={"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": rows3}}))
    add(_request("open", "mlflow-dataframe-split-repeat", "POST", "/invocations", json_body={"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": rows3}}))
    add(_request("open", "mlflow-dataframe-records", "POST", "/invocations", json_body={"dataframe_records": [dict(zip("abcd", r, strict=True)) for r in rows3]}))
    add(_request("open", "mlflow-instances", "POST", "/invocations", json_body={"instances": rows3}))
    add(_request("open", "mlflow-inputs", "POST", "/invocations", json_body={"inputs": [[2, 2, 2, 2]]}))
    add(_request("open", "mlflow-inputs-no-store", "POST", "/invocations", json_body={"inputs": [[2, 2, 2, 2]]}, headers={"Cache-Control": "no-store"}))
    add(_request("open", "mlflow-csv-header", "POST", "/invocations", "a,b,c,d\n1,2,3,4\n0.5,0,0,0\n", headers={"Content-Type": "text/csv"}))
    add(_request("open", "mlflow-csv-bare", "POST", "/invocations", "1,2,3,4\n-1,-1,0,2.25", headers={"Content-Type": "text/csv; charset=utf-8"}))
    add(_request("open", "mlflow-path-onnx-inputs", "POST", "/models/linear-onnx/invocations", json_body={"inputs": {"input": rows3}}))
    add(_request("open", "mlflow-path-onnx-instances", "POST", "/models/linear-onnx/invocations", json_body={"instances": [{"input": r} for r in rows3]}))
    add(_request("open", "mlflow-path-mlp-split", "POST", "/models/tabular-mlp-onnx/invocations", json_body={"dataframe_split": {"columns": ["input"], "data": [[r] for r in _mlp_rows(2, 12)]}}))
    add(_request("open", "mlflow-path-scaler-params", "POST", "/models/scaler/invocations", json_body={"instances": SCALER_EXAMPLE.tolist(), "params": {"scale": 2.0}}))
    add(_request("open", "mlflow-params-not-object", "POST", "/invocations", json_body={"inputs": row, "params": "x"}))
    add(_request("open", "mlflow-unsupported-media", "POST", "/invocations", "1,2,3,4", headers={"Content-Type": "text/plain"}))
    add(_request("open", "mlflow-csv-latin1", "POST", "/invocations", "1,2,3,4", headers={"Content-Type": "text/csv; charset=latin-1"}))
    add(_request("open", "mlflow-malformed-json", "POST", "/invocations", '{"inputs": [[1,2,3,4]', headers={"Content-Type": "application/json"}))
    add(_request("open", "mlflow-not-object", "POST", "/invocations", json_body=[[1, 2, 3, 4]]))
    add(_request("open", "mlflow-no-format-key", "POST", "/invocations", json_body={"data": rows3}))
    add(_request("open", "mlflow-two-format-keys", "POST", "/invocations", json_body={"inputs": row, "instances": row}))
    add(_request("open", "mlflow-wrong-shape", "POST", "/invocations", json_body={"inputs": [[1, 2, 3]]}))
    add(_request("open", "mlflow-wrong-dtype", "POST", "/invocations", json_body={"inputs": [["a", "b", "c", "d"]]}))
    add(_request("open", "mlflow-csv-ragged", "POST", "/invocations", "1,2,3,4\n1,2\n", headers={"Content-Type": "text/csv"}))
    add(_request("open", "mlflow-unknown-model", "POST", "/models/nope/invocations", json_body={"inputs": row}))
    add(_request("open", "mlflow-too-many-rows", "POST", "/invocations", json_body={"instances": [[1, 2, 3, 4]] * (MAX_ROWS + 1)}))
    add(_request("open", "mlflow-body-too-large", "POST", "/models/tabular-mlp-onnx/invocations", json_body={"inputs": big}))
    add(_request("open", "mlflow-body-too-large-chunked", "POST", "/models/tabular-mlp-onnx/invocations", json_body={"inputs": big}, chunked=True))
    add(_request("open", "v2-body-too-large", "POST", "/v2/models/tabular-mlp-onnx/infer", json_body={"inputs": [_v2_tensor([v for r in big for v in r], [MAX_ROWS, 64])]}))
    add(_request("open", "mlflow-ping", "GET", "/ping"))
    add(_request("open", "mlflow-health", "GET", "/health"))
    add(_request("open", "mlflow-version", "GET", "/version"))

    # -- models, health, routing ---------------------------------------------------------------------
    add(_request("open", "models-list", "GET", "/models"))
    add(_request("open", "models-one", "GET", "/models/linear"))
    add(_request("open", "models-one-onnx", "GET", "/models/tabular-mlp-onnx"))
    add(_request("open", "models-unknown", "GET", "/models/nope"))
    add(_request("open", "health-ready", "GET", "/health/ready"))
    add(_request("open", "health-live", "GET", "/health/live"))
    add(_request("open", "unknown-path", "GET", "/nope"))
    add(_request("open", "unknown-path-post", "POST", "/nope", json_body=one))
    add(_request("open", "unknown-v2-path", "GET", "/v2/nope"))
    add(_request("open", "wrong-method-predict", "GET", "/predict"))
    add(_request("open", "wrong-method-invocations", "GET", "/invocations"))
    add(_request("open", "wrong-method-v2-infer", "GET", "/v2/models/linear/infer"))
    add(_request("open", "wrong-method-models", "DELETE", "/models/linear"))
    add(_request("open", "admin-off", "GET", "/admin/models"))

    # -- API keys and the admin token ----------------------------------------------------------------
    bearer, wrong = {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer wrong"}
    add(_request("keys", "keys-predict-missing", "POST", "/predict", json_body=one))
    add(_request("keys", "keys-predict-wrong-bearer", "POST", "/predict", json_body=one, headers=wrong))
    add(_request("keys", "keys-predict-wrong-header", "POST", "/predict", json_body=one, headers={"X-API-Key": "wrong"}))
    add(_request("keys", "keys-predict-wrong-scheme", "POST", "/predict", json_body=one, headers={"Authorization": f"Basic {KEY}"}))
    add(_request("keys", "keys-predict-bearer", "POST", "/predict", json_body=one, headers=bearer))
    add(_request("keys", "keys-predict-header", "POST", "/predict", json_body=one, headers={"X-API-Key": OTHER_KEY}))
    add(_request("keys", "keys-predict-repeat-missing", "POST", "/predict", json_body=one))
    add(_request("keys", "keys-v2-missing", "POST", "/v2/models/linear/infer", json_body=infer_one))
    add(_request("keys", "keys-v2-bearer", "POST", "/v2/models/linear/infer", json_body=infer_one, headers=bearer))
    add(_request("keys", "keys-mlflow-missing", "POST", "/invocations", json_body={"inputs": row}))
    add(_request("keys", "keys-mlflow-wrong", "POST", "/invocations", json_body={"inputs": row}, headers=wrong))
    add(_request("keys", "keys-mlflow-bearer", "POST", "/invocations", json_body={"inputs": row}, headers=bearer))
    add(_request("keys", "keys-models-missing", "GET", "/models"))
    add(_request("keys", "keys-health-ready-open", "GET", "/health/ready"))
    add(_request("keys", "keys-v2-ready-open", "GET", "/v2/health/ready"))
    add(_request("keys", "keys-ping-open", "GET", "/ping"))
    add(_request("keys", "keys-admin-missing", "GET", "/admin/models"))
    add(_request("keys", "keys-admin-api-key-refused", "GET", "/admin/models", headers={"X-API-Key": ADMIN}))
    add(_request("keys", "keys-admin-inference-key-refused", "GET", "/admin/models", headers=bearer))
    add(_request("keys", "keys-admin-token", "GET", "/admin/models", headers={"Authorization": f"Bearer {ADMIN}"}))
    # fmt: on
    return out


# ------------------------------------------------------------------------------------------- replaying
def send(client: httpx.Client, base_url: str, request: dict[str, Any]) -> dict[str, Any]:
    """Send one request; its answer as stored: status, the ``HEADERS`` present, the exact body."""
    body = request_body(request)
    content: bytes | Iterator[bytes] | None = body
    if request.get("chunked") and body is not None:
        content = iter([body[i : i + 4096] for i in range(0, len(body), 4096)])
    url = base_url + request["path"]
    answer = client.request(request["method"], url, content=content, headers=request["headers"])
    headers = {name: answer.headers[name] for name in HEADERS if name in answer.headers}
    body = answer.content
    out: dict[str, Any] = {"status": answer.status_code, "headers": headers}
    out["body_b64"] = base64.b64encode(body).decode()
    with contextlib.suppress(UnicodeDecodeError):
        out["body_text"] = body.decode()  # for people reading the file: the test compares body_b64
    return out


def response_body(response: dict[str, Any]) -> bytes:
    return base64.b64decode(response["body_b64"])


def replay(requests: list[dict[str, Any]], registry: Registry, workdir: Path) -> Iterator[dict[str, Any]]:
    """Start each server of ``SERVERS`` in turn and send it its requests, in order; the answers, in the
    order of ``requests``."""
    answers: dict[int, dict[str, Any]] = {}
    for server_name, (models, env) in SERVERS.items():
        server = start_server(registry, models, workdir / server_name, env)
        try:
            with httpx.Client(timeout=60) as client:
                for index, request in enumerate(requests):
                    if request["server"] == server_name:
                        answers[index] = send(client, server.url, request)
        finally:
            stop_server(server)
    for index in range(len(requests)):
        yield answers[index]


def served_package(workdir: Path) -> dict[str, str]:
    """Which ``service`` package a server started from ``workdir`` imports, and its git commit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    code = "import service; print(service.__file__)"
    path = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    package = Path(path).parent
    git = ["git", "-C", str(package)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True
    ).stdout.strip()
    return {"service_package": str(package), "commit": commit, "service_dirty": str(bool(dirty)).lower()}


def record(workdir: Path) -> dict[str, Any]:
    for name in SERVERS:
        (workdir / name).mkdir(parents=True, exist_ok=True)
    registry = build(workdir / "registry")
    requests = exchanges()
    answers = list(replay(requests, registry, workdir))
    meta = served_package(workdir) | {"recorded_with": "tests/golden/record.py"}
    return {
        "meta": meta,
        "exchanges": [{"request": q, "response": a} for q, a in zip(requests, answers, strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=GOLDEN, help=f"where to write (default {GOLDEN})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ferry-golden-") as tmp:
        recording = record(Path(tmp))
    args.out.write_text(json.dumps(recording, indent=1, ensure_ascii=False) + "\n")
    meta = recording["meta"]
    print(
        f"recorded {len(recording['exchanges'])} exchanges from {meta['service_package']} "
        f"({meta['commit'][:10]}, service/ dirty: {meta['service_dirty']}) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
