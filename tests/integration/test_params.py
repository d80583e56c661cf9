"""Inference parameters reach pyfunc models (``params`` of /predict and /invocations), a wrong one is a
422 naming ``params``, and requests with different params are never answered from each other's batch
or cache entry."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import Registry, Server, register_code_model, start_server, stop_server

X = np.arange(6, dtype=np.float32).reshape(2, 3)


@pytest.fixture(scope="module")
def scaler_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    register_code_model(registry, "scaler", Path(__file__).with_name("scaler_model.py"), X, {"scale": 1.0})
    server = start_server(
        registry, "scaler=models:/scaler@champion", tmp_path_factory.mktemp("scaler"),
        {"FERRY_CACHE__ENABLED": "true"},
    )  # fmt: skip
    yield server
    stop_server(server)


def predict(server: Server, params: object = None, path: str = "/predict") -> httpx.Response:
    body: dict[str, object] = {"inputs": X.tolist()} if path == "/predict" else {"instances": X.tolist()}
    if params is not None:
        body["params"] = params
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def test_params_reach_the_model(scaler_server: Server) -> None:
    assert predict(scaler_server).json()["outputs"] == X.tolist()
    assert predict(scaler_server, {"scale": 3.0}).json()["outputs"] == (X * 3).tolist()
    r = predict(scaler_server, {"scale": 2.0}, path="/invocations")
    assert r.status_code == 200 and r.json()["predictions"] == (X * 2).tolist()


def test_a_params_value_the_signature_refuses_is_a_422_naming_params(scaler_server: Server) -> None:
    r = predict(scaler_server, {"scale": "three"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["details"]["field"] == "params" and "scale" in error["message"]
    # The server keeps answering, the others unaffected.
    assert predict(scaler_server, {"scale": 4.0}).json()["outputs"] == (X * 4).tolist()


def test_concurrent_requests_with_different_params_get_their_own_answers(scaler_server: Server) -> None:
    scales = [float(s % 5 + 1) for s in range(60)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda s: predict(scaler_server, {"scale": s}).json()["outputs"], scales))
    assert answers == [(X * s).tolist() for s in scales]
