"""Challenger traffic with real processes: a real Ferry serving models of a real sqlite MLflow registry in
which each model has ``@champion`` and ``@challenger``, two ONNX versions whose outputs are known exactly.

- shadow: every answer comes from the champion; the challenger's outputs are compared after it, and the
  agreeing rows, the differences and the drops are the ones the inputs were built to give. A challenger
  that raises, answers another shape, or hangs changes no client's answer, and a hanging one makes
  nobody wait (the clients are answered while it is still held at a gate; no timing is measured).
- canary: with share 0.5 and many keys both versions answer and a key always gets the same one; share 0
  never and 1 always answers with the challenger; moving or removing ``@challenger`` is followed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pytest
import torch
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from conftest import (
    Registry,
    Server,
    export_onnx,
    free_port,
    log_onnx,
    metric,
    start_server,
    stop_server,
    wait_until,
)

pytestmark = pytest.mark.integration

EXAMPLE = np.arange(8, dtype=np.float32).reshape(2, 4)
FIRST_THREE = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
"""The champion: y = (x0, x1, x2)."""
SWAPPED = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
"""A challenger: y = (x1, x0, x2). Its argmax differs from the champion's unless x2 is the largest."""
REVERSED = [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]]
"""Another challenger: y = (x2, x1, x0)."""
WEIGHTS = {"FIRST_THREE": FIRST_THREE, "SWAPPED": SWAPPED, "REVERSED": REVERSED}
QUIET = {"FERRY_RELOAD__POLL_S": "0", "FERRY_LOG_LEVEL": "warning"}


def _onnx(weights: list[list[int]], folder: Path) -> object:
    layer = torch.nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weights, dtype=torch.float32))
        layer.bias.zero_()
    path = export_onnx(layer.eval(), EXAMPLE, folder / f"{id(weights)}.onnx")
    return log_onnx(path, EXAMPLE, EXAMPLE @ np.array(weights, dtype=np.float32).T)


def _register(name: str, info: object) -> str:
    return str(mlflow.register_model(info.model_uri, name).version)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def chal_registry(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Registry]:
    """A registry of its own (aliases move here); the session registry stays MLflow's current one."""
    root = tmp_path_factory.mktemp("challenger-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("challenger", artifact_location=(root / "artifacts").as_uri())
        client = MlflowClient()
        with tempfile.TemporaryDirectory() as tmp:
            for name, versions in (
                ("canary", (FIRST_THREE, SWAPPED)),
                ("moving", (FIRST_THREE, SWAPPED, REVERSED)),
                ("faulty", (FIRST_THREE,)),
            ):
                for weights in versions:
                    with mlflow.start_run(experiment_id=experiment):
                        _register(name, _onnx(weights, Path(tmp)))
        with mlflow.start_run(experiment_id=experiment):  # faulty v2: the misbehaving pyfunc challenger
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("challenger_model.py")),
                signature=infer_signature(EXAMPLE, EXAMPLE[:, :3]),
                input_example=EXAMPLE,
            )
            _register("faulty", info)
        for name in ("canary", "moving", "faulty"):
            client.set_registered_model_alias(name, "champion", "1")
            client.set_registered_model_alias(name, "challenger", "2")
        yield Registry(root=root, tracking_uri=uri)
    finally:
        mlflow.set_tracking_uri(registry.tracking_uri)


def _serve(
    chal_registry: Registry, tmp_path_factory: pytest.TempPathFactory, model: str, env: dict[str, str]
) -> Server:
    """A Ferry serving ``model``, once its challenger is loaded too: readiness waits for the champion
    only (until the challenger is ready, the champion answers every request)."""
    server = start_server(
        chal_registry, f"{model}=models:/{model}@champion", tmp_path_factory.mktemp(model), QUIET | env
    )
    ready = wait_until(
        lambda: metric(scrape(server), "ferry_challenger_ready", model=model) == 1,
        timeout_s=120,
        interval_s=0.1,
    )
    if not ready:
        stop_server(server)
        raise AssertionError(f"the challenger of {model} did not load:\n{server.log(4000)}")
    return server


def predict(
    server: Server, model: str, rows: list[list[float]], key: str | None = None
) -> tuple[str, np.ndarray]:
    headers = {"X-Request-Key": key} if key is not None else {}
    r = httpx.post(f"{server.url}/models/{model}/predict", json={"inputs": rows}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == r.headers["X-Model-Version"]
    return body["version"], np.asarray(body["outputs"], dtype=np.float32)


def predict_v2(server: Server, model: str, rows: list[list[float]], key: str) -> tuple[str, np.ndarray]:
    body = {"inputs": [{"name": "input", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}]}
    r = httpx.post(
        f"{server.url}/v2/models/{model}/infer", json=body, headers={"X-Request-Key": key}, timeout=30
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model_version"] == r.headers["X-Model-Version"]
    out = answer["outputs"][0]
    return answer["model_version"], np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def grpc_infer(target: str, row: list[float], key: str) -> Any:
    """One gRPC ModelInfer of ``canary`` with the request key as metadata."""
    import grpc

    from service.grpc import messages

    request = messages.ModelInferRequest(model_name="canary")
    request.inputs.add(name="input", datatype="FP32", shape=[1, len(row)]).contents.fp32_contents.extend(row)
    with grpc.insecure_channel(target) as channel:
        infer = channel.unary_unary(
            f"/{messages.SERVICE}/ModelInfer",
            request_serializer=messages.ModelInferRequest.SerializeToString,
            response_deserializer=messages.ModelInferResponse.FromString,
        )
        return infer(request, timeout=30, metadata=(("x-request-key", key),))


def expected(version: str, rows: list[list[float]], by_version: dict[str, str]) -> np.ndarray:
    weights = np.array(WEIGHTS[by_version[version]], dtype=np.float32)
    return np.asarray(rows, dtype=np.float32) @ weights.T


def scrape(server: Server) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    assert wait_until(condition, timeout_s=timeout_s, interval_s=0.05), f"timed out waiting for {what}"


CANARY = {"1": "FIRST_THREE", "2": "SWAPPED"}


# -- shadow ----------------------------------------------------------------------------------------
def test_shadow_answers_from_the_champion_and_counts_agreement(
    chal_registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = _serve(
        chal_registry,
        tmp_path_factory,
        "canary",
        {"FERRY_CHALLENGER__MODE": "shadow", "FERRY_CHALLENGER__SHARE": "1"},
    )
    try:
        text = scrape(server)
        assert metric(text, "ferry_challenger_ready", model="canary") == 1
        assert metric(text, "ferry_model_info", model="canary", version="2", alias="challenger") == 1
        assert metric(text, "ferry_challenger_compared_rows_total", model="canary") == 0
        sent: list[list[float]] = []
        for i in range(10):
            # Per request: x0 largest (disagree), x1 largest (disagree), x2 largest (agree).
            rows = [[9.0 + i, 1.0, 0.0, 5.0], [0.0, 9.0 + i, 1.0, 5.0], [0.0, 1.0, 9.0 + i, 5.0]]
            version, out = predict(server, "canary", rows, key=f"user-{i}")
            assert version == "1"
            np.testing.assert_array_equal(out, expected("1", rows, CANARY))
            sent += rows
        version, out = predict_v2(server, "canary", [[3.0, 2.0, 1.0, 0.0]], key="v2-client")
        assert version == "1"
        np.testing.assert_array_equal(out, [[3.0, 2.0, 1.0]])
        sent.append([3.0, 2.0, 1.0, 0.0])  # x0 largest: disagrees
        until(
            lambda: (
                metric(scrape(server), "ferry_challenger_compared_rows_total", model="canary") == len(sent)
            ),
            "every shadowed row compared",
        )
        text = scrape(server)
        assert metric(text, "ferry_challenger_agreed_rows_total", model="canary") == 10
        champion, challenger = expected("1", sent, CANARY), expected("2", sent, CANARY)
        differences = np.abs(champion - challenger).max(axis=1)
        assert metric(text, "ferry_challenger_difference_count", model="canary") == len(sent)
        assert metric(text, "ferry_challenger_difference_sum", model="canary") == pytest.approx(
            differences.sum()
        )
        assert metric(text, "ferry_challenger_shadow_dropped_total", model="canary") == 0
        # Latency and requests by version: the challenger ran every row, the clients saw only v1.
        assert metric(text, "ferry_inference_requests_total", model="canary", version="2") == 0
        assert metric(text, "ferry_inference_requests_total", model="canary", version="1") == 11
        assert metric(text, "ferry_batch_rows_sum", model="canary", version="2") >= len(sent)
    finally:
        stop_server(server)


def test_a_failing_or_hanging_challenger_changes_no_answer(
    chal_registry: Registry, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    env = {
        "FERRY_CHALLENGER__MODE": "shadow",
        "FERRY_CHALLENGER__SHARE": "1",
        "FERRY_CHALLENGER__SHADOW_IN_FLIGHT": "2",
        "FERRY_CACHE__ENABLED": "false",
        "CHALLENGER_GATE": str(gate),
    }
    server = _serve(chal_registry, tmp_path_factory, "faulty", env)

    def count(name: str, **labels: str) -> float:
        return metric(scrape(server), name, model="faulty", **labels)

    try:
        assert count("ferry_challenger_ready") == 1
        # It raises: the client gets the champion's answer; the failure is counted, by version too.
        version, out = predict(server, "faulty", [[666.0, 1.0, 2.0, 3.0]])
        assert (version, out.tolist()) == ("1", [[666.0, 1.0, 2.0]])
        until(lambda: count("ferry_challenger_shadow_dropped_total", reason="failed") == 1, "the failure")
        assert count("ferry_inference_failures_total", version="2") == 1
        # It answers five columns where the champion answers three: not comparable, counted as failed.
        version, out = predict(server, "faulty", [[777.0, 1.0, 2.0, 3.0], [777.0, 0.0, 0.0, 0.0]])
        assert (version, out.tolist()) == ("1", [[777.0, 1.0, 2.0], [777.0, 0.0, 0.0]])
        until(lambda: count("ferry_challenger_shadow_dropped_total", reason="failed") == 2, "the shape")
        assert count("ferry_challenger_compared_rows_total") == 0
        # It hangs (held at a gate): every client is answered by the champion while it still hangs.
        # Two shadow calls may run (the first holds the model, the second waits in its queue); the
        # other four are dropped, not queued.
        for i in range(6):
            version, out = predict(server, "faulty", [[555.0, float(i), 0.0, 0.0]])
            assert (version, out.tolist()) == ("1", [[555.0, float(i), 0.0]])
        assert not gate.exists()
        assert count("ferry_challenger_shadow_dropped_total", reason="in_flight") == 4
        assert count("ferry_challenger_compared_rows_total") == 0
        gate.touch()
        until(lambda: count("ferry_challenger_compared_rows_total") == 2, "the two held shadow calls")
        assert count("ferry_challenger_agreed_rows_total") == 2  # it answers as the champion does
        version, out = predict(server, "faulty", [[1.0, 2.0, 3.0, 4.0]])
        assert (version, out.tolist()) == ("1", [[1.0, 2.0, 3.0]])
        until(lambda: count("ferry_challenger_compared_rows_total") == 3, "a later shadow call")
    finally:
        gate.touch()
        stop_server(server)


# -- canary ----------------------------------------------------------------------------------------
def test_canary_is_sticky_by_key_and_splits_by_share(
    chal_registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    grpc_port = free_port()
    server = _serve(
        chal_registry,
        tmp_path_factory,
        "canary",
        {
            "FERRY_CHALLENGER__MODE": "canary",
            "FERRY_CHALLENGER__SHARE": "0.5",
            "FERRY_GRPC_PORT": str(grpc_port),
        },
    )
    try:
        rows = [[1.0, 5.0, 2.0, 0.0]]
        side: dict[str, str] = {}
        for i in range(100):
            version, out = predict(server, "canary", rows, key=f"user-{i}")
            np.testing.assert_array_equal(out, expected(version, rows, CANARY))
            side[f"user-{i}"] = version
        counts = {v: list(side.values()).count(v) for v in ("1", "2")}
        assert counts["1"] > 20 and counts["2"] > 20, counts
        for key, version in list(side.items())[:40]:  # the same key, any protocol: the same version
            assert predict(server, "canary", [[float(len(key)), 0.0, 1.0, 2.0]], key=key)[0] == version
            assert predict_v2(server, "canary", rows, key=key)[0] == version
        for key, version in list(side.items())[:20]:  # gRPC: the key travels as metadata
            answer = grpc_infer(f"127.0.0.1:{grpc_port}", rows[0], key)
            assert answer.model_version == version
            want = expected(version, rows, CANARY)[0].tolist()
            assert list(answer.outputs[0].contents.fp32_contents) == want
        unkeyed = {predict(server, "canary", rows)[0] for _ in range(40)}
        assert unkeyed == {"1", "2"}
        text = scrape(server)
        assert metric(text, "ferry_inference_requests_total", model="canary", version="2") >= counts["2"]
        assert metric(text, "ferry_challenger_compared_rows_total", model="canary") == 0  # no shadowing
    finally:
        stop_server(server)


@pytest.mark.parametrize(("share", "version"), [("0", "1"), ("1", "2")])
def test_canary_share_zero_never_one_always(
    chal_registry: Registry, tmp_path_factory: pytest.TempPathFactory, share: str, version: str
) -> None:
    server = _serve(
        chal_registry,
        tmp_path_factory,
        "canary",
        {"FERRY_CHALLENGER__MODE": "canary", "FERRY_CHALLENGER__SHARE": share},
    )
    try:
        rows = [[1.0, 5.0, 2.0, 0.0]]
        seen = {predict(server, "canary", rows, key=f"k{i}")[0] for i in range(30)}
        seen |= {predict(server, "canary", rows)[0] for _ in range(10)}
        seen |= {predict_v2(server, "canary", rows, key=f"k{i}")[0] for i in range(10)}
        assert seen == {version}
    finally:
        stop_server(server)


def test_the_challenger_follows_its_alias(
    chal_registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {"FERRY_CHALLENGER__MODE": "canary", "FERRY_CHALLENGER__SHARE": "1", "FERRY_RELOAD__POLL_S": "0.3"}
    server = _serve(chal_registry, tmp_path_factory, "moving", env)
    by_version = {"1": "FIRST_THREE", "2": "SWAPPED", "3": "REVERSED"}
    rows = [[1.0, 2.0, 3.0, 4.0]]
    client = MlflowClient(chal_registry.tracking_uri)

    def answered_by(want: str) -> bool:
        version, out = predict(server, "moving", rows, key="alice")
        np.testing.assert_array_equal(out, expected(version, rows, by_version))  # never a mixed answer
        return version == want

    def ready() -> float:
        return metric(scrape(server), "ferry_challenger_ready", model="moving")

    try:
        assert answered_by("2")
        client.set_registered_model_alias("moving", "challenger", "3")  # moved: the new one answers
        until(lambda: answered_by("3"), "challenger v3")
        text = scrape(server)
        assert metric(text, "ferry_model_info", model="moving", version="3", alias="challenger") == 1
        assert metric(text, "ferry_model_info", model="moving", version="2") == 0
        client.delete_registered_model_alias("moving", "challenger")  # removed: the champion answers all
        until(lambda: answered_by("1"), "the champion alone")
        until(lambda: ready() == 0, "ferry_challenger_ready 0")
        client.set_registered_model_alias("moving", "challenger", "2")  # back
        until(lambda: answered_by("2"), "challenger v2 again")
        assert ready() == 1
        client.set_registered_model_alias("moving", "challenger", "1")  # the champion's own version
        until(lambda: ready() == 0, "no challenger beside its own version")
        assert answered_by("1")
        assert "Traceback" not in server.log()
    finally:
        stop_server(server)


# -- memory budget ---------------------------------------------------------------------------------
def test_the_memory_budget_counts_the_challenger(
    chal_registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from service.budget import files_size

    env = {"FERRY_CHALLENGER__MODE": "canary", "FERRY_CHALLENGER__SHARE": "1"}
    server = _serve(
        chal_registry, tmp_path_factory, "canary", env | {"FERRY_MEMORY__BUDGET_BYTES": str(10**10)}
    )
    try:
        downloads = Path(server.log_path).parent / "downloads" / "models" / "canary"
        champion, challenger = files_size(downloads / "1"), files_size(downloads / "2")
        assert champion > 0 and challenger > 0
        assert metric(scrape(server), "ferry_memory_used_bytes") == champion + challenger
    finally:
        stop_server(server)
    # One byte short of both: the champion loads, the challenger does not (nothing is evicted for it),
    # and the champion answers every request of a share-1 canary.
    budget = {"FERRY_MEMORY__BUDGET_BYTES": str(champion + challenger - 1)}
    server = start_server(
        chal_registry,
        "canary=models:/canary@champion",
        tmp_path_factory.mktemp("short"),
        QUIET | env | budget,
    )
    try:
        until(lambda: "challenger v2 not loaded" in server.log(), "the refused challenger's log line")
        text = scrape(server)
        assert metric(text, "ferry_challenger_ready", model="canary") == 0
        assert metric(text, "ferry_memory_used_bytes") == champion
        assert {predict(server, "canary", [[1.0, 2.0, 3.0, 4.0]], key=f"k{i}")[0] for i in range(10)} == {"1"}
    finally:
        stop_server(server)
