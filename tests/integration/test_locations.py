"""Any model location through one code path (issue 13): a model directory by path or ``file://`` URI
(loaded in place, versioned by its content digest), a ``runs:/`` URI, and a served name re-pointed at
another registered model with the same version number (issue 14: it gets that model's own files)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import procs
import pytest
from mlflow_stores import log_linear, register, save_linear, tracking

from conftest import TEST_FLAVORS, Registry, Server, free_port, start_server, stop_server, wait_until_ready
from service.registry import content_digest

pytestmark = pytest.mark.integration
TOKEN = "locations-admin-token"
ROW = [[1, 0, 0, 0]]


@dataclass
class Setup:
    registry: Registry
    alpha: Path
    """A model directory (weight 2), served by its path, without a name."""
    beta: Path
    """A model directory (weight 3), served by its ``file://`` URI, without a name."""
    mutable: Path
    """A model directory (weight 2) served as ``mutable=PATH``; a test rewrites it."""
    run_uri: str
    """``runs:/`` URI of a weight-4 model."""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Setup:
    """A sqlite registry of its own: ``first`` v1 (weight 5) and ``second`` v1 (weight 6), the same
    version number of two registered models; plus model directories and a run."""
    root = tmp_path_factory.mktemp("locations")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking(uri):
        import mlflow

        mlflow.set_experiment("locations")
        assert register("first", log_linear(5.0)) == "1"
        assert register("second", log_linear(6.0)) == "1"
        run_uri = log_linear(4.0)
    models = root / "models"
    return Setup(
        registry=Registry(root=root, tracking_uri=uri),
        alpha=save_linear(models / "alpha", 2.0),
        beta=save_linear(models / "beta", 3.0),
        mutable=save_linear(models / "mutable", 2.0),
        run_uri=run_uri,
    )


@pytest.fixture(scope="module")
def served(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = ",".join(
        [
            str(setup.alpha),
            setup.beta.as_uri(),
            f"mutable={setup.mutable}",
            f"run={setup.run_uri}",
            "pointed=models:/first/1",
        ]
    )
    extra = {"FERRY_RELOAD__POLL_S": "0.3", "FERRY_ADMIN_TOKEN": TOKEN}
    server = start_server(setup.registry, models, tmp_path_factory.mktemp("served"), extra)
    yield server
    stop_server(server)


def predict(server: Server, name: str) -> tuple[str, list[list[float]]]:
    r = httpx.post(f"{server.url}/models/{name}/predict", json={"inputs": ROW}, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["X-Model-Version"], r.json()["outputs"]


def test_a_directory_by_path_and_by_file_uri_is_served_in_place(served: Server, setup: Setup) -> None:
    assert predict(served, "alpha") == (content_digest(setup.alpha), [[3.0] * 3])
    assert predict(served, "beta") == (content_digest(setup.beta), [[4.0] * 3])
    assert content_digest(setup.alpha).startswith("sha-") and len(content_digest(setup.alpha)) == 16
    downloads = served.log_path.parent / "downloads"
    assert not (downloads / "content").exists(), "a local directory was copied"
    described = httpx.get(f"{served.url}/models/alpha", timeout=10).json()
    assert described["version"] == content_digest(setup.alpha)


def test_the_content_digest_ignores_where_the_files_lie_and_follows_their_bytes(
    setup: Setup, tmp_path: Path
) -> None:
    copy = shutil.copytree(setup.alpha, tmp_path / "elsewhere")
    assert content_digest(copy) == content_digest(setup.alpha)
    assert content_digest(copy) != content_digest(setup.beta)
    (copy / "extra.txt").write_text("x")
    assert content_digest(copy) != content_digest(setup.alpha)


def test_a_runs_uri_is_downloaded_once_under_its_run(served: Server, setup: Setup) -> None:
    run_id = setup.run_uri.split("/")[1]
    assert predict(served, "run") == (f"run-{run_id[:8]}", [[5.0] * 3])
    assert (served.log_path.parent / "downloads" / "runs" / run_id / "model" / "MLmodel").is_file()


def test_a_name_re_pointed_at_another_model_with_the_same_version_gets_its_files(
    served: Server,
) -> None:
    assert predict(served, "pointed") == ("1", [[6.0] * 3])  # first v1: weight 5
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.put(
        f"{served.url}/admin/models/pointed", json={"uri": "models:/second/1"}, headers=auth, timeout=60
    )
    assert r.status_code == 200, r.text
    assert predict(served, "pointed") == ("1", [[7.0] * 3])  # second v1: weight 6, not first's files
    downloads = served.log_path.parent / "downloads" / "models"
    assert (downloads / "second" / "1" / "MLmodel").is_file()
    assert not (downloads / "first" / "1").exists(), "the retired version's copy was kept"


def test_a_directory_whose_files_change_is_reloaded_under_a_new_version(served: Server, setup: Setup) -> None:
    before = content_digest(setup.mutable)
    assert predict(served, "mutable") == (before, [[3.0] * 3])
    staged = save_linear(setup.mutable.parent / ".mutable-next", 9.0)
    shutil.rmtree(setup.mutable)
    staged.rename(setup.mutable)
    after = content_digest(setup.mutable)
    assert after != before
    deadline = time.monotonic() + 60
    while predict(served, "mutable")[0] != after and time.monotonic() < deadline:
        time.sleep(0.2)
    assert predict(served, "mutable") == (after, [[10.0] * 3])
    assert f"model mutable now serves v{after} (was v{before})" in served.log()


def test_the_version_of_a_directory_is_the_same_after_a_restart(
    setup: Setup, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Started once with ``FERRY_MODELS=again=PATH``, once with ``ferry serve --model again=PATH``."""
    versions = []
    server = start_server(setup.registry, f"again={setup.beta}", tmp_path_factory.mktemp("restart"))
    try:
        versions.append(predict(server, "again")[0])
    finally:
        stop_server(server)
    workdir, port = tmp_path_factory.mktemp("restart"), free_port()
    argv = [sys.executable, "-m", "service", "serve", "--port", str(port), "--model", f"again={setup.beta}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    env |= setup.registry.env() | {
        "FERRY_DOWNLOAD_DIR": str(workdir / "downloads"),
        "FERRY_SHUTDOWN__GRACE_S": "0",
        "FERRY_ALLOWED_FLAVORS": TEST_FLAVORS,
    }
    url = f"http://127.0.0.1:{port}"
    server = procs.launch("ferry", argv, workdir / "ferry.log", url=url, env=env, cwd=workdir)
    try:
        wait_until_ready(server)
        versions.append(predict(server, "again")[0])
    finally:
        stop_server(server)
    assert versions == [content_digest(setup.beta)] * 2
