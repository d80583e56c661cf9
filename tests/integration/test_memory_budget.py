"""More models than memory (issue 16), against real Ferry processes and a real MLflow registry.

Models of known sizes: three ONNX linear layers of 256 outputs and 256, 128 and 64 inputs (``wide``,
``mid``, ``narrow``: about 263, 132 and 66 kB of weights), whose sizes the test measures as Ferry does
(their registered files, downloaded). A budget that holds any two of them but not all three: start-up
loads the first two, the third stays unloaded (readiness stays 200), its first request loads it and
evicts the least recently used idle one. Then models written for it: ``gated`` (a request waits at a
gate file: a request in flight) and ``slow`` (its loading waits at a gate file: a load in progress),
under a budget that holds only one of them: the busy one is never evicted (503 over_budget naming the
budget), concurrent first requests share one load, and a model larger than the whole budget is 503.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import (
    Registry,
    Server,
    _register,
    export_onnx,
    log_onnx,
    metric,
    register_code_model,
    start_server,
    stop_server,
    wait_until,
)
from service.budget import files_size

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
FEATURES = {"wide": 256, "mid": 128, "narrow": 64}
CODE_X = np.zeros((1, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def sized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, dict[str, int]]:
    """A registry of its own with wide, mid, narrow, gated and slow (``champion`` each), and each
    model's size as Ferry measures it: its registered files, downloaded."""
    import mlflow
    import torch

    previous = mlflow.get_tracking_uri()
    root = tmp_path_factory.mktemp("sized-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("tests", artifact_location=(root / "artifacts").as_uri())
        registry = Registry(root=root, tracking_uri=uri)
        with tempfile.TemporaryDirectory() as tmp:
            for name, features in FEATURES.items():
                torch.manual_seed(features)
                module = torch.nn.Linear(features, 256).eval()
                example = np.ones((2, features), dtype=np.float32)
                path = export_onnx(module, example, Path(tmp) / f"{name}.onnx")
                with torch.inference_mode():
                    output = module(torch.from_numpy(example)).numpy()
                with mlflow.start_run(experiment_id=experiment):
                    _register(name, log_onnx(path, example, output), "champion")
        register_code_model(registry, "gated", HERE / "gated_model.py", CODE_X, {"gate": "", "log": ""})
        register_code_model(registry, "slow", HERE / "slow_load_model.py", CODE_X, {})
        sizes = {}
        for name in (*FEATURES, "gated", "slow"):
            local = mlflow.artifacts.download_artifacts(
                f"models:/{name}/1", dst_path=str(root / "sizes" / name)
            )
            sizes[name] = files_size(Path(local))
    finally:
        mlflow.set_tracking_uri(previous)
    return registry, sizes


def get(server: Server, path: str) -> httpx.Response:
    return httpx.get(f"{server.url}{path}", timeout=30)


def metrics(server: Server, name: str, **labels: str) -> float:
    return metric(get(server, "/metrics").text, name, **labels)


def states(server: Server) -> dict[str, str]:
    return {m["name"]: m["state"] for m in get(server, "/models").json()["models"]}


def predict(server: Server, name: str, rows: list[list[float]], **params: str) -> httpx.Response:
    body: dict[str, Any] = {"inputs": rows}
    if params:
        body["params"] = params
    return httpx.post(f"{server.url}/models/{name}/predict", json=body, timeout=60)


def ones(name: str) -> list[list[float]]:
    return [[1.0] * FEATURES[name]]


@pytest.fixture(scope="module")
def lru_server(
    sized: tuple[Registry, dict[str, int]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, dict[str, int], int]]:
    registry, sizes = sized
    wide, mid, narrow = (sizes[n] for n in FEATURES)
    budget = wide + mid + narrow // 2
    assert wide + mid <= budget < wide + mid + narrow, "any two fit, never all three"
    models = ",".join(f"{n}=models:/{n}@champion" for n in FEATURES)
    server = start_server(
        registry, models, tmp_path_factory.mktemp("lru"), {"FERRY_MEMORY__BUDGET_BYTES": str(budget)}
    )
    yield server, sizes, budget
    stop_server(server)


def test_start_up_loads_what_fits_in_order_and_stays_ready(
    lru_server: tuple[Server, dict[str, int], int],
) -> None:
    server, sizes, budget = lru_server
    assert states(server) == {"wide": "ready", "mid": "ready", "narrow": "unloaded"}
    ready = get(server, "/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["models"]["narrow"] == "unloaded"
    v2 = get(server, "/v2/models/narrow/ready")
    assert (v2.status_code, v2.json()) == (503, {"name": "narrow", "ready": False})
    assert metrics(server, "ferry_memory_budget_bytes") == budget
    assert metrics(server, "ferry_memory_used_bytes") == sizes["wide"] + sizes["mid"]
    assert metrics(server, "ferry_model_loads_total", model="narrow") == 0
    assert "model narrow not loaded at start-up, it loads on its first request" in server.log()


def test_a_first_request_loads_the_model_and_evicts_the_least_recently_used_idle_one(
    lru_server: tuple[Server, dict[str, int], int],
) -> None:
    server, sizes, _budget = lru_server
    assert predict(server, "wide", ones("wide")).status_code == 200
    assert predict(server, "mid", ones("mid")).status_code == 200  # wide is now the least recently used
    answer = predict(server, "narrow", ones("narrow"))
    assert answer.status_code == 200, answer.text
    assert np.asarray(answer.json()["outputs"]).shape == (1, 256)
    assert states(server) == {"wide": "unloaded", "mid": "ready", "narrow": "ready"}
    assert metrics(server, "ferry_model_loads_total", model="narrow", reason="first_request") == 1
    assert metrics(server, "ferry_model_unloads_total", model="wide", reason="evicted") == 1
    assert metrics(server, "ferry_model_unloads_total", model="mid") == 0
    assert metrics(server, "ferry_memory_used_bytes") == sizes["mid"] + sizes["narrow"]
    log = server.log()
    assert (
        "model wide v1 unloaded (evicted: the least recently used idle model, to make room for narrow" in log
    )
    assert "model narrow v1 loaded (first_request)" in log
    assert get(server, "/health/ready").status_code == 200
    # wide again: now mid was used before narrow, so mid goes; the answer is wide's own.
    again = predict(server, "wide", ones("wide"))
    assert again.status_code == 200, again.text
    assert states(server) == {"wide": "ready", "mid": "unloaded", "narrow": "ready"}


@pytest.fixture(scope="module")
def busy_server(
    sized: tuple[Registry, dict[str, int]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Path, int]]:
    registry, sizes = sized
    budget = max(sizes["gated"], sizes["slow"]) + min(sizes["gated"], sizes["slow"]) // 2
    assert sizes["wide"] > budget, "wide can never fit"
    workdir = tmp_path_factory.mktemp("busy")
    gate = workdir / "gate"
    gate.mkdir()
    models = "gated=models:/gated@champion,slow=models:/slow@champion,wide=models:/wide@champion"
    env = {"FERRY_MEMORY__BUDGET_BYTES": str(budget), "SLOW_LOAD_DIR": str(gate)}
    server = start_server(registry, models, workdir, env)
    yield server, gate, budget
    stop_server(server)


def test_a_model_with_a_request_in_flight_is_never_evicted(
    busy_server: tuple[Server, Path, int], tmp_path: Path
) -> None:
    server, _gate, budget = busy_server
    assert states(server) == {"gated": "ready", "slow": "unloaded", "wide": "unloaded"}
    opened, calls = tmp_path / "open", tmp_path / "calls"
    held: dict[str, httpx.Response] = {}
    request = threading.Thread(
        target=lambda: held.update(
            r=predict(server, "gated", [[1.0, 2.0, 3.0]], gate=str(opened), log=str(calls))
        )
    )
    request.start()
    try:
        assert wait_until(calls.exists, timeout_s=30, interval_s=0.02), (
            "the gated request never reached the model"
        )
        refused = predict(server, "slow", [[1.0, 2.0, 3.0]])
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "over_budget"
        assert "FERRY_MEMORY__BUDGET_BYTES" in error["message"] and f"{budget:,} bytes" in error["message"]
        assert "in use or loading: gated" in error["message"], error["message"]
        assert refused.headers.get("retry-after")
        assert states(server)["gated"] == "ready"
        assert metrics(server, "ferry_model_unloads_total", model="gated") == 0
    finally:
        opened.touch()
        request.join(60)
    assert held["r"].status_code == 200, held["r"].text
    assert held["r"].json()["outputs"] == [[1.0, 2.0, 3.0]]


def test_concurrent_first_requests_share_one_load(busy_server: tuple[Server, Path, int]) -> None:
    server, gate, _budget = busy_server
    assert states(server)["slow"] == "unloaded"
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def ask() -> None:
        response = predict(server, "slow", [[1.0, 2.0, 3.0]])
        with lock:
            answers.append(response)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    try:
        assert wait_until(
            lambda: metrics(server, "http_requests_inprogress", handler="/models/{name}/predict") == 6,
            timeout_s=30,
            interval_s=0.05,
        ), "the six requests never all waited"
        assert (gate / "loads").read_text().splitlines() == ["load"], "one load, held at its gate"
        assert states(server)["slow"] == "loading"
    finally:
        (gate / "open").touch()
        for thread in threads:
            thread.join(60)
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    assert all(a.json()["outputs"] == [[2.0, 4.0, 6.0]] for a in answers)
    assert (gate / "loads").read_text().splitlines() == ["load"]
    assert metrics(server, "ferry_model_loads_total", model="slow", reason="first_request") == 1
    assert metrics(server, "ferry_model_unloads_total", model="gated", reason="evicted") == 1
    assert states(server) == {"gated": "unloaded", "slow": "ready", "wide": "unloaded"}


def test_a_model_larger_than_the_whole_budget_is_503_naming_it(busy_server: tuple[Server, Path, int]) -> None:
    server, _gate, budget = busy_server
    refused = predict(server, "wide", ones("wide"))
    assert refused.status_code == 503, refused.text
    message = refused.json()["error"]["message"]
    assert "more than the whole memory budget" in message and f"{budget:,} bytes" in message, message
    assert states(server)["wide"] == "unloaded"
    assert get(server, "/health/ready").status_code == 200
    v2 = httpx.post(
        f"{server.url}/v2/models/wide/infer",
        json={"inputs": [{"name": "input", "shape": [1, 256], "datatype": "FP32", "data": [1.0] * 256}]},
        timeout=30,
    )
    assert v2.status_code == 503 and "FERRY_MEMORY__BUDGET_BYTES" in v2.json()["error"]


def test_no_budget_loads_everything_at_start_up(
    sized: tuple[Registry, dict[str, int]], tmp_path: Path
) -> None:
    registry, _sizes = sized
    server = start_server(registry, "mid=models:/mid@champion,narrow=models:/narrow@champion", tmp_path)
    try:
        assert states(server) == {"mid": "ready", "narrow": "ready"}
        assert metrics(server, "ferry_memory_budget_bytes") == 0
        assert metrics(server, "ferry_model_loads_total", reason="startup") == 2
    finally:
        stop_server(server)
