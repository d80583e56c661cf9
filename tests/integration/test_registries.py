"""Production registries against real servers the tests start (issue 13): an MLflow tracking server with
proxied artifacts (Ferry is given only its URL), an MLflow registry on PostgreSQL (a fresh database per
module; skipped with the reason when PostgreSQL is not on 127.0.0.1:5432), ``register-demo`` against a
server, and registries that are down, refuse Ferry or lost a model's files: 503 with the cause, the
model ``failed``, no traceback in the log."""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import register as demo
from mlflow.tracking import MlflowClient
from mlflow_stores import (
    POSTGRES_HOST,
    POSTGRES_PORT,
    log_linear,
    postgres_database,
    postgres_missing,
    register,
    start_tracking_server,
    tracking,
)

from conftest import Registry, Server, free_port, linear_module, start_server, stop_server
from service.registry import content_digest

pytestmark = pytest.mark.integration
ROW = [[1, 0, 0, 0]]


def predict(server: Server, name: str) -> httpx.Response:
    return httpx.post(f"{server.url}/models/{name}/predict", json={"inputs": ROW}, timeout=30)


def answer(server: Server, name: str) -> tuple[str, list[list[float]]]:
    r = predict(server, name)
    assert r.status_code == 200, r.text
    return r.headers["X-Model-Version"], r.json()["outputs"]


def wait_for_version(server: Server, name: str, version: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = predict(server, name)
        if r.status_code == 200 and r.headers["X-Model-Version"] == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} never served v{version}:\n{server.log(3000)}")


def wait_for_state(server: Server, name: str, state: str, timeout_s: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            with_state = httpx.get(f"{server.url}/models/{name}", timeout=10)
        except httpx.TransportError:  # not listening yet
            with_state = None
        if with_state is not None and with_state.status_code == 200 and with_state.json()["state"] == state:
            return dict(with_state.json())
        time.sleep(0.2)
    raise AssertionError(f"{name} never became {state}:\n{server.log(3000)}")


def assert_failed_with_503(server: Server, name: str, cause: str) -> None:
    """The model is ``failed`` with ``cause`` in its error, a request gets 503 naming it, the log says
    it in one line, and no traceback was logged."""
    described = wait_for_state(server, name, "failed")
    assert cause in str(described["error"]), described
    r = predict(server, name)
    assert r.status_code == 503 and cause in r.json()["error"]["message"], r.text
    log = server.log()
    assert f"model {name} not loaded: " in log and cause in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


# -- an MLflow tracking server with proxied artifacts ----------------------------------------------


@dataclass
class TrackingStore:
    server: Server
    root: Path
    raw_uri: str
    """The ``mlflow-artifacts:/`` location of a weight-4 model that is not registered."""


@pytest.fixture(scope="module")
def tracking_store(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[TrackingStore]:
    """``proxied`` v1 (weight 2, ``@champion``) and v2 (weight 3); ``lost`` v1, whose files are then
    deleted from the server's artifact folder; and an unregistered run's model."""
    root = tmp_path_factory.mktemp("tracking-server")
    server = start_tracking_server(root)
    try:
        with tracking(server.url):
            mlflow.set_experiment("served")  # created by the server: its default artifact root
            assert mlflow.get_experiment_by_name("served").artifact_location.startswith("mlflow-artifacts:/")
            register("proxied", log_linear(2.0), alias="champion")
            register("proxied", log_linear(3.0))
            register("lost", log_linear(5.0))
            run_id = log_linear(4.0).split("/")[1]
            raw_uri = f"{MlflowClient().get_run(run_id).info.artifact_uri}/model"
            lost = MlflowClient().get_model_version_download_uri("lost", "1")
        assert raw_uri.startswith("mlflow-artifacts:/") and lost.startswith("mlflow-artifacts:/")
        shutil.rmtree(root / "artifacts" / lost.removeprefix("mlflow-artifacts:/"))
        yield TrackingStore(server, root, raw_uri)
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def via_server(tracking_store: TrackingStore, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Ferry whose only registry setting is the server's URL."""
    models = f"proxied=models:/proxied@champion,raw={tracking_store.raw_uri},lost=models:/lost/1"
    server = start_server(
        Registry(tracking_store.root, tracking_store.server.url),
        models,
        tmp_path_factory.mktemp("via-server"),
        {"FERRY_RELOAD__POLL_S": "0.3"},
        wait_ready=False,
    )
    yield server
    stop_server(server)


def test_a_model_registered_through_a_server_is_served_from_it_and_follows_its_alias(
    via_server: Server, tracking_store: TrackingStore
) -> None:
    wait_for_state(via_server, "proxied", "ready")
    assert answer(via_server, "proxied") == ("1", [[3.0] * 3])
    with tracking(tracking_store.server.url):
        MlflowClient().set_registered_model_alias("proxied", "champion", "2")
    wait_for_version(via_server, "proxied", "2")
    assert answer(via_server, "proxied") == ("2", [[4.0] * 3])
    assert "model proxied now serves v2 (was v1)" in via_server.log()
    downloads = via_server.log_path.parent / "downloads"
    assert (downloads / "models" / "proxied" / "2" / "MLmodel").is_file()


def test_an_mlflow_artifacts_uri_is_served_under_its_content_digest(
    via_server: Server, tracking_store: TrackingStore
) -> None:
    wait_for_state(via_server, "raw", "ready")
    on_server = tracking_store.root / "artifacts" / tracking_store.raw_uri.removeprefix("mlflow-artifacts:/")
    digest = content_digest(on_server)
    assert answer(via_server, "raw") == (digest, [[5.0] * 3])
    copy = via_server.log_path.parent / "downloads" / "content" / digest.removeprefix("sha-")
    assert (copy / "MLmodel").is_file()
    time.sleep(1.0)  # a few polls: the listing is unchanged, so nothing is downloaded or swapped again
    assert "model raw now serves" not in via_server.log()


def test_a_version_whose_artifacts_were_deleted_is_failed_with_the_cause(via_server: Server) -> None:
    assert_failed_with_503(
        via_server, "lost", "models:/lost/1 has no files: they are missing from the artifact store"
    )


def test_register_demo_leaves_the_artifact_location_to_a_tracking_server(
    tracking_store: TrackingStore, tmp_path: Path
) -> None:
    url = tracking_store.server.url
    assert demo.artifact_location(url) is None
    assert demo.artifact_location("https://mlflow.example.com") is None
    for local in ("sqlite:///.ferry/mlflow.db", "postgresql://u@db/mlflow", str(tmp_path), "file:///tmp/x"):
        assert str(demo.artifact_location(local)).startswith("file://"), local
    with tracking(url):
        demo.use_experiment(url)
        assert mlflow.get_experiment_by_name(demo.EXPERIMENT).artifact_location.startswith(
            "mlflow-artifacts:/"
        )
        example = np.arange(8, dtype=np.float32).reshape(2, 4)
        with mlflow.start_run():
            info = demo.log_torch(linear_module(2.0), example)
        version = demo.publish(MlflowClient(), "demo-through-server", "fingerprint", info)
        # MLflow 3 records a logged model (models:/m-...) as the version's source; its files live where
        # the server put them.
        where = MlflowClient().get_model_version_download_uri("demo-through-server", version)
    assert where.startswith("mlflow-artifacts:/"), where


def test_a_tracking_server_that_does_not_answer_gives_503_and_no_traceback(
    registry: Registry, tmp_path: Path
) -> None:
    nowhere = Registry(tmp_path, f"http://127.0.0.1:{free_port()}")
    server = start_server(nowhere, "m=models:/m@champion", tmp_path, wait_ready=False)
    try:
        assert_failed_with_503(server, "m", "did not answer")
    finally:
        stop_server(server)


# -- an MLflow registry on PostgreSQL ----------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_registry(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Iterator[Registry]:
    """A fresh database: ``pg`` v1 (weight 2, ``@champion``) and v2 (weight 3); artifacts in a folder."""
    reason = postgres_missing()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("postgres")
    with postgres_database() as uri, tracking(uri):
        experiment = mlflow.create_experiment("pg", artifact_location=(root / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=experiment)
        register("pg", log_linear(2.0), alias="champion")
        register("pg", log_linear(3.0))
        yield Registry(root, uri)


def test_a_postgres_registry_is_served_and_followed(postgres_registry: Registry, tmp_path: Path) -> None:
    server = start_server(
        postgres_registry, "pg=models:/pg@champion", tmp_path, {"FERRY_RELOAD__POLL_S": "0.3"}
    )
    try:
        assert answer(server, "pg") == ("1", [[3.0] * 3])
        with tracking(postgres_registry.tracking_uri):
            MlflowClient().set_registered_model_alias("pg", "champion", "2")
        wait_for_version(server, "pg", "2")
        assert answer(server, "pg") == ("2", [[4.0] * 3])
    finally:
        stop_server(server)


@pytest.mark.parametrize(
    ("user", "database", "cause"),
    [
        ("nobody_{rand}", "postgres", 'role "nobody_{rand}" does not exist'),
        ("postgres", "absent_{rand}", 'database "absent_{rand}" does not exist'),
    ],
    ids=["wrong-user", "wrong-database"],
)
def test_a_postgres_registry_that_refuses_ferry_gives_503_and_no_traceback(
    tmp_path: Path, user: str, database: str, cause: str
) -> None:
    reason = postgres_missing()
    if reason is not None:
        pytest.skip(reason)
    rand = secrets.token_hex(3)
    uri = (
        f"postgresql://{user.format(rand=rand)}@{POSTGRES_HOST}:{POSTGRES_PORT}/{database.format(rand=rand)}"
    )
    server = start_server(Registry(tmp_path, uri), "m=models:/m@champion", tmp_path, wait_ready=False)
    try:
        assert_failed_with_503(server, "m", cause.format(rand=rand))
        assert "refused the connection" in server.log()
    finally:
        stop_server(server)
