"""Alias following under load: a good new version is swapped in with no failed request; broken versions
(an artifact that does not load, outputs of the wrong shape, NaN outputs) are rejected while the old
version keeps serving, and the rejections show in /metrics."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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
    fault_summary,
    linear_module,
    log_torch,
    metric,
    start_server,
    stop_server,
)

pytestmark = pytest.mark.integration
EXAMPLE = np.arange(8, dtype=np.float32).reshape(2, 4)


@pytest.fixture(scope="module")
def follow_registry(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Registry]:
    """A registry of its own (aliases move here); the session registry stays MLflow's current one."""
    root = tmp_path_factory.mktemp("follow-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        yield _populate(uri, root)
    finally:
        mlflow.set_tracking_uri(registry.tracking_uri)


def _populate(uri: str, root: Path) -> Registry:
    experiment = mlflow.create_experiment("follow", artifact_location=(root / "artifacts").as_uri())

    for weight in (2.0, 3.0):  # v1, v2
        with mlflow.start_run(experiment_id=experiment):
            mlflow.register_model(log_torch(linear_module(weight), EXAMPLE).model_uri, "follow")
    with (
        mlflow.start_run(experiment_id=experiment) as run,
        tempfile.TemporaryDirectory() as tmp,
    ):  # v3: does not load
        path = Path(tmp) / "model"
        mlflow.pytorch.save_model(
            linear_module(), str(path), serialization_format="pt2", input_example=EXAMPLE
        )
        (path / "data" / "model.pt2").write_bytes(b"not a torch archive")
        mlflow.log_artifacts(str(path), "model")
        mlflow.register_model(f"runs:/{run.info.run_id}/model", "follow")
    wide = linear_module(2.0, outputs=5)  # v4: outputs 5 columns, the signature says 3
    with mlflow.start_run(experiment_id=experiment):
        with torch.inference_mode():
            out = linear_module()(torch.from_numpy(EXAMPLE)).numpy()
        info = mlflow.pytorch.log_model(
            wide, name="model", serialization_format="pt2", signature=infer_signature(EXAMPLE, out),
            input_example=EXAMPLE, pip_requirements=["torch"],
        )  # fmt: skip
        mlflow.register_model(info.model_uri, "follow")
    nan = linear_module(2.0, bias=float("nan"))  # v5: NaN outputs
    with mlflow.start_run(experiment_id=experiment):
        mlflow.register_model(log_torch(nan, EXAMPLE).model_uri, "follow")
    client = MlflowClient()
    client.set_registered_model_alias("follow", "champion", "1")
    return Registry(root=root, tracking_uri=uri)


def move_alias(registry: Registry, version: str) -> None:
    MlflowClient(tracking_uri=registry.tracking_uri).set_registered_model_alias("follow", "champion", version)


@pytest.fixture(scope="module")
def following(follow_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        follow_registry, "follow=models:/follow@champion", tmp_path_factory.mktemp("follow"),
        {"FERRY_RELOAD__POLL_S": "0.3"},
    )  # fmt: skip
    yield server
    stop_server(server)


class Load:
    """8 clients sending continuously; every response is checked against the version it names."""

    def __init__(self, url: str) -> None:
        self.url, self.stop = url, threading.Event()
        self.results: list[tuple[int, str]] = []
        self.latencies: list[float] = []
        self.wrong: list[str] = []
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(8)]

    def _client(self, i: int) -> None:
        weights = {"1": 2, "2": 3}
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                started = time.perf_counter()
                r = http.post("/predict", json={"inputs": [[i, 1, 0, 0]]})
                self.latencies.append(time.perf_counter() - started)
                version = r.headers.get("X-Model-Version", "")
                self.results.append((r.status_code, version))
                if r.status_code == 200 and r.json()["outputs"] != [[weights[version] * (i + 1) + 1.0] * 3]:
                    self.wrong.append(f"v{version}: {r.text}")

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def wait_for(self, predicate: object, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if callable(predicate) and predicate():
                return
            time.sleep(0.1)
        raise AssertionError("condition not reached in time")


def test_good_version_swaps_in_under_load_then_broken_ones_are_rejected(
    following: Server, follow_registry: Registry
) -> None:
    with Load(following.url) as load:
        load.wait_for(lambda: len(load.results) > 50)
        move_alias(follow_registry, "2")
        load.wait_for(lambda: load.results[-1][1] == "2")
        swapped_at = len(load.results)
        time.sleep(1.0)
        assert {v for _, v in load.results[swapped_at + 16 :]} == {"2"}, "old version still answering"
        for broken in ("3", "4", "5"):
            move_alias(follow_registry, broken)
            # The log, not a counter: a rejected version is retried with backoff, so counters can
            # run ahead of the alias moves.
            load.wait_for(lambda: f"model follow v{broken} rejected" in following.log())
        time.sleep(0.5)
    fault_summary(
        "alias moved v1->v2, then to 3 broken versions, 8 clients",
        [s for s, _ in load.results],
        load.latencies,
    )
    statuses = {s for s, _ in load.results}
    assert statuses == {200}, f"failed requests during swaps: {statuses}"
    assert not load.wrong, load.wrong[:3]
    assert {v for _, v in load.results[-20:]} == {"2"}
    text = httpx.get(f"{following.url}/metrics").text
    assert metric(text, "ferry_model_reloads_total", model="follow", result="swapped") >= 1
    assert metric(text, "ferry_model_load_failures_total", model="follow", stage="load") >= 1
    assert metric(text, "ferry_model_load_failures_total", model="follow", stage="warmup") >= 2
    assert metric(text, "ferry_model_info", model="follow", version="2") == 1
    assert metric(text, "ferry_model_info", model="follow", version="1") == 0
    assert httpx.get(f"{following.url}/health/ready").status_code == 200
    log = following.log()
    assert "now serves v2 (was v1)" in log and "rejected" in log and "v2 keeps serving" in log
    downloads = following.log_path.parent / "downloads" / "models" / "follow"
    assert (downloads / "2" / "MLmodel").is_file()
    assert not (downloads / "1").exists(), "the retired version's files were kept"


def test_a_fixed_version_is_picked_up_when_the_alias_moves_again(
    following: Server, follow_registry: Registry
) -> None:
    move_alias(follow_registry, "1")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.post(f"{following.url}/predict", json={"inputs": [[1, 0, 0, 0]]})
        if r.headers["X-Model-Version"] == "1":
            break
        time.sleep(0.2)
    assert r.status_code == 200 and r.json()["outputs"] == [[3.0] * 3]
