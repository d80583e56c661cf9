"""scripts/promote.py, the steps of promote.yml and model-rollback.yml, run as the workflows run them (a
subprocess per step, ``MLFLOW_TRACKING_URI`` naming one registry at a time) against real MLflow
registries the tests create: two sqlite registries with their own artifact folders (staging and
production), and two ``mlflow server --serve-artifacts`` processes for separate servers.

What is shown: a version reaches production by its files (it loads, and a real Ferry serves it, after
staging's files are gone); @challenger, @champion and @previous-champion move as documented; a rerun
registers nothing twice; a rollback goes back once and then refuses; a Ferry following @champion
serves the promoted version, then the rolled-back one; bad input is exit status 2 naming what is
missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow_stores import log_linear, register, start_tracking_server, tracking

from conftest import (
    ROOT,
    Registry,
    export_onnx,
    linear_module,
    log_onnx,
    start_server,
    stop_server,
    wait_until,
)

pytestmark = pytest.mark.integration
PROMOTE = ROOT / "scripts" / "promote.py"
ROW = [[1.0, 0.0, 0.0, 0.0]]
"""output = weight * sum(row) + 1: 3.0 for the weight-2 version, 4.0 for the weight-3 one."""


@dataclass
class Result:
    code: int
    out: Any
    err: str


def promote(uri: str | None, *args: str | Path, **extra_env: str) -> Result:
    """``scripts/promote.py ARGS`` with only ``uri`` as MLflow's registry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FERRY_"))}
    if uri is not None:
        env["MLFLOW_TRACKING_URI"] = uri
    env |= extra_env
    done = subprocess.run(
        [sys.executable, str(PROMOTE), *map(str, args)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    try:
        out = json.loads(done.stdout) if done.stdout.strip() else None
    except ValueError:
        out = done.stdout
    return Result(done.returncode, out, done.stderr)


def ok(result: Result) -> Any:
    assert result.code == 0, f"exit {result.code}\nstdout: {result.out}\nstderr: {result.err[-3000:]}"
    return result.out


def aliases(uri: str, name: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri=uri).get_registered_model(name).aliases
    return {alias: str(version) for alias, version in found.items()}


def sqlite_registry(root: Path) -> Registry:
    """An empty sqlite registry with an experiment ``models`` whose files stay under ``root``."""
    import mlflow

    root.mkdir(parents=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with tracking(uri):
        mlflow.create_experiment("models", artifact_location=(root / "artifacts").as_uri())
    return Registry(root=root, tracking_uri=uri)


def train(uri: str, weights: list[float], experiment: str | None = "models") -> list[str]:
    """Register one version of ``linear`` per weight in ``uri``; the first becomes @champion."""
    import mlflow

    versions = []
    with tracking(uri):
        if experiment is not None:
            mlflow.set_experiment(experiment)
        for i, weight in enumerate(weights):
            versions.append(register("linear", log_linear(weight), "champion" if i == 0 else None))
    return versions


def load_and_predict(uri: str, model_uri: str) -> float:
    import mlflow
    import numpy as np

    with tracking(uri):
        model = mlflow.pyfunc.load_model(model_uri)
    out = model.predict({"input": np.array(ROW, dtype=np.float32)})
    if isinstance(out, dict):  # ONNX pyfunc: {output name: array}
        (out,) = out.values()
    return float(np.asarray(out).reshape(-1)[0])


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Registry, Registry]:
    """Staging with ``linear`` v1 (weight 2, @champion) and v2 (weight 3); production empty."""
    root = tmp_path_factory.mktemp("promote")
    staging, production = sqlite_registry(root / "staging"), sqlite_registry(root / "production")
    assert train(staging.tracking_uri, [2.0, 3.0]) == ["1", "2"]
    return staging, production


def test_promotion_moves_files_and_aliases_and_rollback_goes_back_once(
    stores: tuple[Registry, Registry], tmp_path: Path
) -> None:
    staging, production = stores
    prod_artifacts = (production.root / "promotions").as_uri()

    # Staging: v2 becomes the challenger; @champion stays where it was.
    out = ok(promote(staging.tracking_uri, "challenger", "linear", "2"))
    assert out["version"] == "2" and out["previous"] is None
    assert aliases(staging.tracking_uri, "linear") == {"champion": "1", "challenger": "2"}

    # First promotion into an empty production registry: v1, no previous champion to record.
    first = ok(promote(staging.tracking_uri, "export", "linear", "1", tmp_path / "v1"))
    assert first["name"] == "linear" and first["version"] == "1" and len(first["digest"]) == 64
    assert (tmp_path / "v1" / "model" / "MLmodel").is_file()
    out = ok(
        promote(production.tracking_uri, "champion", tmp_path / "v1", "--artifact-location", prod_artifacts)
    )
    assert (out["version"], out["previous"], out["already_registered"]) == ("1", None, False)
    assert aliases(production.tracking_uri, "linear") == {"champion": "1"}

    # Then v2: production's v2, @previous-champion on production's v1.
    second = ok(promote(staging.tracking_uri, "export", "linear", "2", tmp_path / "v2"))
    out = ok(
        promote(production.tracking_uri, "champion", tmp_path / "v2", "--artifact-location", prod_artifacts)
    )
    assert (out["version"], out["previous"]) == ("2", "1")
    assert out["source"] == {"registry": staging.tracking_uri, "name": "linear", "version": "2"}
    assert aliases(production.tracking_uri, "linear") == {"champion": "2", "previous-champion": "1"}

    # A rerun of the same step (a retried workflow) finds its version and registers nothing.
    again = ok(
        promote(production.tracking_uri, "champion", tmp_path / "v2", "--artifact-location", prod_artifacts)
    )
    assert (again["version"], again["previous"], again["already_registered"]) == ("2", None, True)
    assert aliases(production.tracking_uri, "linear") == {"champion": "2", "previous-champion": "1"}

    from mlflow.tracking import MlflowClient

    prod = MlflowClient(tracking_uri=production.tracking_uri)
    assert sorted(str(v.version) for v in prod.search_model_versions("name = 'linear'")) == ["1", "2"]
    tags = prod.get_model_version("linear", "2").tags
    assert tags["ferry.source.version"] == "2" and tags["ferry.digest"] == second["digest"]
    assert tags["ferry.source.registry"] == staging.tracking_uri

    # Production's copy is its own: it loads and computes v2's function with staging's files gone.
    assert prod.get_model_version("linear", "2").source.startswith(prod_artifacts)
    (staging.root / "artifacts").rename(staging.root / "away")
    try:
        assert load_and_predict(production.tracking_uri, "models:/linear@champion") == pytest.approx(4.0)
    finally:
        (staging.root / "away").rename(staging.root / "artifacts")

    # Rollback: @champion back to v1, @previous-champion used up, v2 marked.
    out = ok(promote(production.tracking_uri, "rollback", "linear"))
    assert (out["version"], out["demoted"]) == ("1", "2")
    assert aliases(production.tracking_uri, "linear") == {"champion": "1"}
    assert "ferry.rolled_back_at" in prod.get_model_version("linear", "2").tags
    assert load_and_predict(production.tracking_uri, "models:/linear@champion") == pytest.approx(3.0)

    # A second rollback has nothing recorded: it refuses rather than flip back to v2.
    refused = promote(production.tracking_uri, "rollback", "linear")
    assert refused.code == 2 and "previous-champion" in refused.err and "--to" in refused.err
    assert aliases(production.tracking_uri, "linear") == {"champion": "1"}
    # An explicit version still works, and must exist.
    assert ok(promote(production.tracking_uri, "rollback", "linear", "--to", "2"))["version"] == "2"
    missing = promote(production.tracking_uri, "rollback", "linear", "--to", "9")
    assert missing.code == 2 and "linear version 9" in missing.err


def test_a_logged_model_of_mlflow_3_is_promoted_too(tmp_path: Path) -> None:
    """``log_model(name=...)`` registers ``models:/m-<id>`` (a LoggedModel, files outside the run's
    artifacts): its files are found and copied as well."""
    import mlflow
    import numpy as np

    staging = sqlite_registry(tmp_path / "staging")
    production = sqlite_registry(tmp_path / "production")
    example = np.array(ROW * 2, dtype=np.float32)
    with tracking(staging.tracking_uri):
        mlflow.set_experiment("models")
        onnx_path = export_onnx(linear_module(5.0), example, tmp_path / "linear.onnx")
        with mlflow.start_run():
            info = log_onnx(onnx_path, example, 5 * example.sum(1, keepdims=True).repeat(3, 1) + 1)
        version = register("linear", info.model_uri, "champion")
    from mlflow.tracking import MlflowClient

    assert (
        MlflowClient(tracking_uri=staging.tracking_uri)
        .get_model_version("linear", version)
        .source.startswith("models:/m-")
    )
    ok(promote(staging.tracking_uri, "export", "linear", version, tmp_path / "export"))
    out = ok(
        promote(
            production.tracking_uri,
            "champion",
            tmp_path / "export",
            "--artifact-location",
            (production.root / "promotions").as_uri(),
        )
    )
    assert out["version"] == "1"
    assert load_and_predict(production.tracking_uri, "models:/linear@champion") == pytest.approx(6.0)


def test_has_alias_answers_with_its_exit_status(stores: tuple[Registry, Registry]) -> None:
    staging, _ = stores
    assert ok(promote(staging.tracking_uri, "has-alias", "linear", "champion"))["version"] == "1"
    assert promote(staging.tracking_uri, "has-alias", "linear", "nobody").code == 1
    assert promote(staging.tracking_uri, "has-alias", "no-such-model", "champion").code == 1


def test_bad_input_is_exit_2_naming_what_is_missing(
    stores: tuple[Registry, Registry], tmp_path: Path
) -> None:
    staging, production = stores
    cases = [
        (promote(staging.tracking_uri, "challenger", "linear", "7"), "linear version 7 is not in"),
        (promote(staging.tracking_uri, "challenger", "no-such-model", "1"), "no-such-model version 1"),
        (promote(staging.tracking_uri, "challenger", "linear", "two"), "version must be a number"),
        (promote(None, "challenger", "linear", "1"), "MLFLOW_TRACKING_URI is not set"),
        (promote(production.tracking_uri, "champion", tmp_path / "nothing"), "run export first"),
    ]
    for result, needle in cases:
        assert result.code == 2 and needle in result.err, (needle, result)
        assert "Traceback" not in result.err

    # An export whose files changed after it was made is refused, not registered.
    ok(promote(staging.tracking_uri, "export", "linear", "1", tmp_path / "export"))
    with (tmp_path / "export" / "model" / "MLmodel").open("a") as f:
        f.write("# edited\n")
    tampered = promote(production.tracking_uri, "champion", tmp_path / "export")
    assert tampered.code == 2 and "does not match the digest" in tampered.err
    # Exporting over an earlier export is refused too.
    again = promote(staging.tracking_uri, "export", "linear", "1", tmp_path / "export")
    assert again.code == 2 and "is not empty" in again.err


def test_ferry_follows_champion_through_promotion_and_rollback(tmp_path: Path) -> None:
    """Production's Ferry serves models:/linear@champion: a promotion and a rollback reach it."""
    staging = sqlite_registry(tmp_path / "staging")
    production = sqlite_registry(tmp_path / "production")
    train(staging.tracking_uri, [2.0, 3.0])
    prod_artifacts = (production.root / "promotions").as_uri()
    for version in ("1", "2"):
        ok(promote(staging.tracking_uri, "export", "linear", version, tmp_path / f"v{version}"))
    ok(promote(production.tracking_uri, "champion", tmp_path / "v1", "--artifact-location", prod_artifacts))
    server = start_server(
        production,
        "linear=models:/linear@champion",
        tmp_path / "ferry",
        extra_env={"FERRY_RELOAD__POLL_S": "0.5"},
    )

    def served() -> tuple[str, float]:
        r = httpx.post(f"{server.url}/predict", json={"model": "linear", "inputs": ROW}, timeout=30)
        assert r.status_code == 200, r.text
        return r.headers["X-Model-Version"], r.json()["outputs"][0][0]

    try:
        assert served() == ("1", pytest.approx(3.0))
        ok(
            promote(
                production.tracking_uri, "champion", tmp_path / "v2", "--artifact-location", prod_artifacts
            )
        )
        assert wait_until(lambda: served()[0] == "2", 60, 0.2), f"never served v2:\n{server.log(3000)}"
        assert served() == ("2", pytest.approx(4.0))
        ok(promote(production.tracking_uri, "rollback", "linear"))
        assert wait_until(lambda: served()[0] == "1", 60, 0.2), f"never back to v1:\n{server.log(3000)}"
        assert served() == ("1", pytest.approx(3.0))
    finally:
        stop_server(server)


def test_promotion_between_separate_tracking_servers(tmp_path: Path) -> None:
    """Staging and production as two ``mlflow server --serve-artifacts``: the production version's files
    are uploaded through production's server, and it loads with staging's server stopped."""
    staging = start_tracking_server(tmp_path / "staging")
    try:
        production = start_tracking_server(tmp_path / "production")
    except BaseException:
        stop_server(staging)
        raise
    try:
        assert train(staging.url, [3.0], experiment="models") == ["1"]
        ok(promote(staging.url, "export", "linear", "1", tmp_path / "export"))
        out = ok(promote(production.url, "champion", tmp_path / "export"))
        assert (out["version"], out["source"]["registry"]) == ("1", staging.url)
        from mlflow.tracking import MlflowClient

        source = MlflowClient(tracking_uri=production.url).get_model_version("linear", "1").source
        assert source.startswith("mlflow-artifacts:/"), source
        stop_server(staging)
        assert load_and_predict(production.url, "models:/linear@champion") == pytest.approx(4.0)
    finally:
        stop_server(staging)
        stop_server(production)
