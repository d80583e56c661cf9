"""Loads never race each other (a real uvicorn process, a model whose loading is held at a gate):
the reloader's polls during a slow start-up load start no second load and log no error, and two models
loading at once both load, each as itself (MLflow's loaders share process-wide state)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import (
    Registry,
    Server,
    metric,
    register_code_model,
    start_server,
    stop_server,
    wait_until,
    wait_until_ready,
)

pytestmark = pytest.mark.integration

X = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def code_models(registry: Registry) -> Registry:
    register_code_model(registry, "slow", HERE / "slow_load_model.py", X, {})
    register_code_model(registry, "scaler", HERE / "scaler_model.py", X, {"scale": 1.0})
    return registry


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    folder = tmp_path / "gate"
    folder.mkdir()
    return folder


def started_loads(gate: Path) -> int:
    loads = gate / "loads"
    return len(loads.read_text().splitlines()) if loads.exists() else 0


def serve(registry: Registry, models: str, workdir: Path, gate: Path, **env: str) -> Iterator[Server]:
    server = start_server(registry, models, workdir, {"SLOW_LOAD_DIR": str(gate), **env}, wait_ready=False)
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def polling(code_models: Registry, tmp_path: Path, gate: Path) -> Iterator[Server]:
    yield from serve(code_models, "slow=models:/slow@champion", tmp_path, gate, FERRY_RELOAD__POLL_S="0.1")


def outputs(server: Server, model: str) -> list[list[float]]:
    r = httpx.post(f"{server.url}/models/{model}/predict", json={"inputs": X.tolist()}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def test_polls_during_a_slow_start_up_load_start_no_second_load(polling: Server, gate: Path) -> None:
    assert wait_until(lambda: started_loads(gate) == 1, timeout_s=60), polling.log()
    time.sleep(1.0)  # about ten polls while the start-up load is held
    (gate / "open").touch()
    wait_until_ready(polling)
    assert outputs(polling, "slow") == [[2.0, 4.0, 6.0]]
    text = httpx.get(f"{polling.url}/metrics").text
    assert started_loads(gate) == 1, "the version was loaded twice"
    assert metric(text, "ferry_model_load_duration_seconds_count", model="slow") == 1
    assert metric(text, "ferry_model_load_failures_total", model="slow") == 0
    assert metric(text, "ferry_model_reloads_total", model="slow") == 0
    time.sleep(0.3)  # more polls, now that the version serves: nothing to do
    log = polling.log()
    assert "ERROR" not in log and "rejected" not in log, log


def test_two_models_loading_at_once_both_load_as_themselves(
    code_models: Registry, tmp_path: Path, gate: Path
) -> None:
    env = {"FERRY_ADMIN_TOKEN": "secret-admin-token", "FERRY_RELOAD__POLL_S": "0"}
    for server in serve(code_models, "slow=models:/slow@champion", tmp_path, gate, **env):
        assert wait_until(lambda: started_loads(gate) == 1, timeout_s=60), server.log()
        added: dict[str, httpx.Response] = {}

        def add() -> None:
            added["r"] = httpx.put(
                f"{server.url}/admin/models/scaler",
                json={"uri": "models:/scaler@champion"},
                headers={"Authorization": "Bearer secret-admin-token"},
                timeout=60,
            )

        adding = threading.Thread(target=add)
        adding.start()  # loads scaler while slow's load is held
        time.sleep(1.0)
        (gate / "open").touch()
        adding.join(60)
        assert added["r"].status_code == 200, added["r"].text
        wait_until_ready(server)
        assert outputs(server, "slow") == [[2.0, 4.0, 6.0]], "slow was loaded as another model"
        assert outputs(server, "scaler") == [[1.0, 2.0, 3.0]]
        assert "ERROR" not in server.log(), server.log()


def test_torch_pt2_models_loading_at_once_at_start_up_all_load(registry: Registry, tmp_path: Path) -> None:
    """``torch.export.load`` keeps one deserializer per process; start-up loads models at once."""
    models = "a=models:/linear@champion,b=models:/linear@challenger,c=models:/linear/1"
    server = start_server(registry, models, tmp_path, {"FERRY_RELOAD__POLL_S": "0"})
    try:
        x = [[1.0, 0.0, 0.0, 0.0]]
        for model, weight in (("a", 2.0), ("b", 3.0), ("c", 2.0)):
            r = httpx.post(f"{server.url}/models/{model}/predict", json={"inputs": x}, timeout=30)
            assert r.json()["outputs"] == [[weight + 1.0] * 3], r.text
        assert "ERROR" not in server.log(), server.log()
    finally:
        stop_server(server)
