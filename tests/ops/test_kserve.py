"""Ferry on KServe (deploy/kserve/): the storage initializer entry point, ``ferry fetch-model``, run for
real against an MLflow registry (sqlite)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import Registry

ROOT = Path(__file__).resolve().parents[2]


def fetch_model(registry: Registry, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``ferry fetch-model ARGS`` as KServe's init container runs it: arguments only, the registry in
    ``MLFLOW_TRACKING_URI``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "service", "fetch-model", *map(str, args)],
        env=env | registry.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_fetch_model_downloads_the_aliased_version_into_the_folder(
    registry: Registry, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    expected = MlflowClient(registry.tracking_uri).get_model_version_by_alias("linear", "champion").version
    dest = tmp_path / "mnt" / "models"
    done = fetch_model(registry, "models:/linear@champion", dest)
    assert done.returncode == 0, done.stderr
    assert f"models:/linear/{expected}" in done.stdout
    assert (dest / "MLmodel").is_file(), sorted(p.name for p in dest.iterdir())
    assert "model_version: '" + str(expected) + "'" in (dest / "registered_model_meta").read_text()
    assert not list(dest.glob(".ferry-fetch-*")), "the staging folder is gone"
    again = fetch_model(registry, "models:/linear@champion", dest)
    assert again.returncode == 0 and "already holds" in again.stdout, "an init container may run again"


def test_fetch_model_takes_pairs_as_kserve_passes_them(registry: Registry, tmp_path: Path) -> None:
    """KServe's multi-URI storage initializer arguments: SRC DEST SRC DEST."""
    done = fetch_model(
        registry, "models:/linear-onnx@champion", tmp_path / "a", "models:/linear/2", tmp_path / "b"
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "MLmodel").is_file() and (tmp_path / "b" / "MLmodel").is_file()
    assert "onnx" in (tmp_path / "a" / "MLmodel").read_text()


def test_fetch_model_fails_loudly_and_leaves_nothing(registry: Registry, tmp_path: Path) -> None:
    missing = fetch_model(registry, "models:/linear@nope", tmp_path / "x")
    assert missing.returncode == 1 and "linear@nope" in missing.stderr
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "other").write_text("not a model")
    refused = fetch_model(registry, "models:/linear@champion", occupied)
    assert refused.returncode == 1 and "not empty" in refused.stderr
    assert sorted(p.name for p in occupied.iterdir()) == ["other"]
    assert fetch_model(registry, "s3://bucket/model", tmp_path / "y").returncode == 2
    assert fetch_model(registry, "models:/linear@champion").returncode == 2
