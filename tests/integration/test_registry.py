"""The registry against a real MLflow registry (sqlite file in a temp dir): resolve, download, load."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import Registry
from service.config import Settings
from service.errors import ModelNotFound, RegistryUnavailable
from service.registry import ModelRegistry

pytestmark = pytest.mark.integration
X = np.array([[1, 2, 3, 4]], dtype=np.float32)


@pytest.fixture
def models(registry: Registry, tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(
        Settings(tracking_uri=registry.tracking_uri, download_dir=str(tmp_path), device="cpu")
    )


def test_alias_and_version_resolve_to_versions(models: ModelRegistry) -> None:
    assert models.resolve("models:/linear@champion").version == "1"
    assert models.resolve("models:/linear@challenger").version == "2"
    ref = models.resolve("models:/linear/2")
    assert (ref.version, ref.alias, ref.download_uri) == ("2", None, "models:/linear/2")


@pytest.mark.parametrize("uri", ["models:/linear@nope", "models:/linear/99", "models:/absent@champion"])
def test_unknown_versions_are_not_found(models: ModelRegistry, uri: str) -> None:
    with pytest.raises(ModelNotFound, match="MLflow has no model version"):
        models.resolve(uri)


def test_load_by_alias_gives_the_aliased_weights(models: ModelRegistry) -> None:
    champion = models.load("linear", models.resolve("models:/linear@champion"))
    challenger = models.load("linear", models.resolve("models:/linear@challenger"))
    assert champion.flavor == "pytorch"
    assert champion.runtime.predict_batch({"input": X})["output"].tolist() == [[21.0] * 3]
    assert challenger.runtime.predict_batch({"input": X})["output"].tolist() == [[31.0] * 3]
    [spec] = champion.inputs
    assert (spec.name, spec.dtype, spec.shape) == ("input", np.dtype(np.float32), (-1, 4))
    assert champion.input_example is not None and champion.input_example["input"].shape == (2, 4)


def test_onnx_model_loads_with_onnx_runtime_and_is_cached_on_disk(
    models: ModelRegistry, tmp_path: Path
) -> None:
    loaded = models.load("linear-onnx", models.resolve("models:/linear-onnx@champion"))
    assert loaded.flavor == "onnx" and loaded.runtime.info.providers == ("CPUExecutionProvider",)
    assert loaded.runtime.predict_batch({"input": X})["output"].tolist() == [[21.0] * 3]
    assert (tmp_path / "models" / "linear-onnx" / "1" / "MLmodel").exists()
    again = models.load("linear-onnx", models.resolve("models:/linear-onnx/1"))  # from the local copy
    assert again.runtime.predict_batch({"input": X})["output"].tolist() == [[21.0] * 3]


def test_unreachable_registry_fails_fast_and_says_so(tmp_path: Path) -> None:
    from conftest import free_port

    models = ModelRegistry(
        Settings(tracking_uri=f"http://127.0.0.1:{free_port()}", download_dir=str(tmp_path), device="cpu")
    )
    with pytest.raises(RegistryUnavailable, match="did not answer"):
        models.resolve("models:/linear@champion")


@pytest.mark.parametrize("allowed", [None, "true"])
def test_pickle_is_refused_unless_the_operator_allows_it(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allowed: str | None
) -> None:
    import mlflow

    from conftest import linear_module
    from service.errors import ModelLoadError

    path = tmp_path / "pickled"
    mlflow.pytorch.save_model(linear_module(), str(path), serialization_format="pickle", input_example=X)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "recorded")  # restored (unset) after the test
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    if allowed is not None:
        monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", allowed)
    models = ModelRegistry(Settings(tracking_uri=registry.tracking_uri, download_dir=str(tmp_path / "d")))
    ref = models.resolve(str(path))
    if allowed is None:
        assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"  # Ferry's default, not MLflow's
        with pytest.raises(ModelLoadError, match="MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
            models.load("pickled", ref)
    else:
        loaded = models.load("pickled", ref)
        assert loaded.runtime.predict_batch({loaded.inputs[0].name: X})
