"""MLflow: resolve a model URI to a version, download it, read its signature, build a ``Runtime``.

The only module of Ferry that imports mlflow. ``MLFLOW_TRACKING_URI`` (a sqlite file, Postgres or an
MLflow server) decides where models come from; artifacts are downloaded once per model version into
``Settings.download_dir``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.config import Settings
from service.errors import ConfigurationError, ModelLoadError, ModelNotFound, RegistryUnavailable
from service.runtime.base import Runtime, TensorSpec, resolve_device

log = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")
_RUNS_URI = re.compile(r"^runs:/(?P<run>[0-9a-zA-Z]+)/(?P<path>.+)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LOADER = threading.Lock()
"""Held while MLflow's flavor loaders run, across every model of the process. They keep process-wide
state that two loads at once corrupt: ``torch.export.load`` (MLflow's ``pt2`` PyTorch format) sets a
module-global deserializer and fails a second one ("_CURRENT_DESERIALIZER is already set"); a
models-from-code pyfunc hands its model over in ``mlflow.models.model.__mlflow_model__``, so a second
load in between gives the first one the wrong model; pyfunc loading also edits ``sys.path`` for a model's
code and clears a global dependency schema. ONNX models load through ONNX Runtime, whose sessions are
built independently, and downloads hold no global state: neither takes the lock."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One configured model: the name it is served under and where it comes from."""

    name: str
    uri: str

    @classmethod
    def parse(cls, entry: str) -> ModelSpec:
        """``name=URI`` or ``URI`` (the name then comes from the URI)."""
        name, sep, uri = entry.partition("=")
        if not sep:
            uri, name = entry, ""
        uri, name = uri.strip(), name.strip()
        if match := _MODELS_URI.match(uri):
            name = name or match["name"]
        elif match := _RUNS_URI.match(uri):
            name = name or match["path"].rstrip("/").rsplit("/", 1)[-1]
        else:
            raise ConfigurationError(
                f"model URI {uri!r} is not models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH",
                uri=uri,
            )
        if not _NAME.match(name):
            raise ConfigurationError(f"model name {name!r} must be letters, digits, '.', '_' or '-'")
        return cls(name=name, uri=uri)


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A URI resolved to one immutable version."""

    uri: str
    alias: str | None
    version: str
    download_uri: str


@dataclass(slots=True)
class LoadedModel:
    """A model version on its device, with what the registry knows about it."""

    name: str
    ref: ModelRef
    flavor: str
    runtime: Runtime
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    input_example: dict[str, np.ndarray] | None


class ModelRegistry:
    """Talks to MLflow for one Ferry process."""

    def __init__(self, settings: Settings) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self._settings = settings
        # MLflow retries an unreachable server for minutes by default; a look-up that fails should fail
        # in seconds, so the reloader reports it and tries again at its next poll. Explicit settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        self._client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
        mlflow.set_tracking_uri(settings.tracking_uri)
        if settings.registry_uri:
            mlflow.set_registry_uri(settings.registry_uri)
        self._download_dir = Path(settings.download_dir)

    def resolve(self, uri: str) -> ModelRef:
        """The version a URI points at now (an alias is looked up on every call)."""
        from mlflow.exceptions import MlflowException

        if match := _RUNS_URI.match(uri):
            return ModelRef(uri=uri, alias=None, version=f"run-{match['run'][:8]}", download_uri=uri)
        match = _MODELS_URI.match(uri)
        if match is None:
            raise ModelNotFound(f"cannot resolve model URI {uri!r}", uri=uri)
        name, alias, version = match["name"], match["alias"], match["version"]
        try:
            if alias is not None:
                version = self._client.get_model_version_by_alias(name, alias).version
            else:
                version = self._client.get_model_version(name, version).version
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                message = f"MLflow has no model version for {uri!r}: {exc.message}"
                raise ModelNotFound(message, uri=uri) from exc
            raise RegistryUnavailable(f"MLflow registry did not answer for {uri!r}: {exc.message}") from exc
        except Exception as exc:  # driver errors of a sqlite/Postgres store, network errors
            raise RegistryUnavailable(f"MLflow registry failed for {uri!r}: {exc!r}") from exc
        return ModelRef(uri=uri, alias=alias, version=str(version), download_uri=f"models:/{name}/{version}")

    def load(self, name: str, ref: ModelRef) -> LoadedModel:
        """Download (once) and load one version onto the configured device."""
        local = self._download(name, ref)
        from mlflow.models import Model

        try:
            meta = Model.load(str(local))
            example = meta.load_input_example(str(local))
        except Exception as exc:
            raise ModelLoadError(f"model {name} v{ref.version}: unreadable MLmodel: {exc}") from exc
        signature_inputs = _specs(meta.signature.inputs if meta.signature else None, "input")
        signature_outputs = _specs(meta.signature.outputs if meta.signature else None, "output")
        try:
            if "onnx" in meta.flavors:
                flavor, runtime, signature_inputs, signature_outputs = "onnx", *self._onnx(local, meta)
            elif "pytorch" in meta.flavors:
                with _LOADER:
                    flavor, runtime = "pytorch", self._torch(local, signature_inputs, signature_outputs)
            elif "python_function" in meta.flavors:
                with _LOADER:
                    flavor, runtime = "pyfunc", self._pyfunc(local, meta, signature_inputs, signature_outputs)
            else:
                raise ModelLoadError(f"model {name} v{ref.version} has no flavor Ferry can serve")
        except (ModelLoadError, ConfigurationError):
            raise
        except Exception as exc:
            raise ModelLoadError(f"model {name} v{ref.version} failed to load: {exc}") from exc
        if not signature_inputs:
            raise ModelLoadError(
                f"model {name} v{ref.version} has no signature: log it with a signature "
                "(mlflow.models.infer_signature) so Ferry can validate inputs"
            )
        return LoadedModel(
            name=name,
            ref=ref,
            flavor=flavor,
            runtime=runtime,
            inputs=signature_inputs,
            outputs=signature_outputs,
            input_example=_example(example, signature_inputs),
        )

    def device(self) -> str:
        from service.runtime.torch import cuda_device_count

        return resolve_device(self._settings.device, cuda_device_count())

    def _download(self, name: str, ref: ModelRef) -> Path:
        import mlflow

        safe_version = re.sub(r"[^A-Za-z0-9._-]", "_", ref.version)
        target = self._download_dir / name / safe_version
        if (target / "MLmodel").exists():
            return target
        partial = target.with_name(f".{safe_version}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            path = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=ref.download_uri, dst_path=str(partial))
            )
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise ModelLoadError(f"model {name} v{ref.version}: download failed: {exc}") from exc
        if not (path / "MLmodel").exists():
            shutil.rmtree(partial, ignore_errors=True)
            raise ModelLoadError(f"model {name} v{ref.version}: {ref.download_uri} holds no MLmodel file")
        shutil.rmtree(target, ignore_errors=True)
        path.rename(target)
        shutil.rmtree(partial, ignore_errors=True)
        return target

    def _onnx(self, local: Path, meta: Any) -> tuple[Runtime, list[TensorSpec], list[TensorSpec]]:
        from service.runtime.onnx import OnnxRuntime

        data = meta.flavors["onnx"].get("data", "model.onnx")
        runtime = OnnxRuntime(str(local / data), self.device(), self._settings.runtime.intra_op_threads)
        return runtime, runtime.input_specs(), runtime.output_specs()

    def _torch(self, local: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Runtime:
        import mlflow.pytorch

        from service.runtime.torch import TorchRuntime, set_cpu_threads

        set_cpu_threads(self._settings.runtime.intra_op_threads)
        module = mlflow.pytorch.load_model(str(local), map_location="cpu")
        return TorchRuntime(module, self.device(), [s.name for s in inputs], [s.name for s in outputs])

    def _pyfunc(self, local: Path, meta: Any, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> Runtime:
        import mlflow.pyfunc

        from service.runtime.pyfunc import PyfuncRuntime

        model = mlflow.pyfunc.load_model(str(local))
        out = outputs[0].name if outputs else "output"
        return PyfuncRuntime(model.predict, [s.name for s in inputs], out)


def _specs(schema: Any, default_name: str) -> list[TensorSpec]:
    """MLflow TensorSpec schema to Ferry specs (column schemas become one 2-D input)."""
    if schema is None or len(schema.inputs) == 0:
        return []
    if schema.is_tensor_spec():
        specs = []
        for i, spec in enumerate(schema.inputs):
            name = spec.name or (default_name if len(schema.inputs) == 1 else f"{default_name}_{i}")
            specs.append(TensorSpec(name, np.dtype(spec.type), tuple(int(d) for d in spec.shape)))
        return specs
    dtypes = {np.dtype(col.type.to_numpy()) for col in schema.inputs}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float64)
    return [TensorSpec(default_name, dtype, (-1, len(schema.inputs)))]


def _example(example: Any, inputs: list[TensorSpec]) -> dict[str, np.ndarray] | None:
    if example is None:
        return None
    if isinstance(example, Mapping):
        return {str(k): np.asarray(v) for k, v in example.items()}
    if hasattr(example, "to_numpy"):
        example = example.to_numpy()
    return {inputs[0].name: np.asarray(example, dtype=inputs[0].dtype)}
