"""Train the demo models and register them in MLflow with the alias ``champion``.

``ferry register-demo`` (and ``make serve``) runs this. The registry is ``MLFLOW_TRACKING_URI``
(default: the sqlite file ``.ferry/mlflow.db``, artifacts under ``.ferry/artifacts``; against a tracking
server the server keeps the artifacts, see ``artifact_location``). Each model
version is tagged with a fingerprint of this code and the torch version; when the ``champion`` already
carries the same fingerprint nothing is trained or registered, so running it again takes a second.

- ``tabular-mlp``: PyTorch MLP, 64 float32 features -> 256 -> 256 -> 10 logits (logged as ``pt2``).
- ``tabular-mlp-onnx``: the same trained network exported to ONNX with a dynamic batch axis.
- ``image-cnn``: a small PyTorch CNN on 3x64x64 float32 images -> 10 logits.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import nets  # noqa: E402

ALIAS = "champion"
EXPERIMENT = "ferry-demo"
DEFAULT_URI = "sqlite:///.ferry/mlflow.db"
log = logging.getLogger("ferry.demo")


def fingerprint(name: str) -> str:
    digest = hashlib.sha256(f"{name}|torch {torch.__version__}|mlflow {mlflow.__version__}".encode())
    for source in ("nets.py", "register.py"):
        digest.update((HERE / source).read_bytes())
    return digest.hexdigest()[:16]


def current(client: MlflowClient, name: str, fp: str) -> str | None:
    """The champion's version if it was built from this exact code, else None."""
    try:
        version = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None
    return version.version if version.tags.get("ferry.fingerprint") == fp else None


def publish(client: MlflowClient, name: str, fp: str, model_info: mlflow.models.model.ModelInfo) -> str:
    version = mlflow.register_model(model_info.model_uri, name, tags={"ferry.fingerprint": fp})
    client.set_registered_model_alias(name, ALIAS, version.version)
    return str(version.version)


def log_torch(model: torch.nn.Module, example: np.ndarray) -> mlflow.models.model.ModelInfo:
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pt2",
        signature=infer_signature(example, output),
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


def log_onnx(model: torch.nn.Module, example: np.ndarray) -> mlflow.models.model.ModelInfo:
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(
            model,
            (torch.from_numpy(example),),
            path,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
        proto = onnx.load(path)
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature({"input": example}, output)
    return mlflow.onnx.log_model(
        proto,
        name="model",
        signature=signature,
        input_example={"input": example},
        pip_requirements=[f"onnx=={onnx.__version__}", "onnxruntime"],
    )


def artifact_location(tracking_uri: str) -> str | None:
    """Where the demo experiment keeps its artifacts. A tracking server decides (``None``): with
    ``--serve-artifacts`` that is ``mlflow-artifacts:/``, uploaded through the server and downloaded by
    Ferry from it, so no client path ends up in the registry. A store Ferry and this script open
    themselves (sqlite, a file folder, a database) gets a ``file://`` folder on this machine:
    ``FERRY_ARTIFACTS_DIR``, default ``.ferry/artifacts``."""
    scheme = tracking_uri.split(":", 1)[0].lower() if ":" in tracking_uri else ""
    if scheme in ("http", "https") or scheme.startswith("databricks") or scheme == "uc":
        return None
    return Path(os.environ.get("FERRY_ARTIFACTS_DIR", ".ferry/artifacts")).resolve().as_uri()


def use_experiment(uri: str) -> None:
    """Create the demo experiment unless it exists (see ``artifact_location``) and make it current."""
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location(uri))
    mlflow.set_experiment(EXPERIMENT)


def main() -> None:
    uri = os.environ.setdefault("MLFLOW_TRACKING_URI", DEFAULT_URI)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    use_experiment(uri)
    client = MlflowClient()

    fps = {name: fingerprint(name) for name in ("tabular-mlp", "tabular-mlp-onnx", "image-cnn")}
    todo = {name: fp for name, fp in fps.items() if current(client, name, fp) is None}
    for name in sorted(set(fps) - set(todo)):
        log.info("%s@%s is up to date (fingerprint %s)", name, ALIAS, fps[name])
    if not todo:
        return
    started = time.perf_counter()
    if {"tabular-mlp", "tabular-mlp-onnx"} & set(todo):
        x, y = nets.tabular_data(20_000, seed=1)
        mlp = nets.train(nets.TabularMLP(), x, y, steps=400, batch=256, seed=1)
        holdout = nets.tabular_data(2_000, seed=2)
        log.info("tabular-mlp trained: holdout accuracy %.3f", nets.accuracy(mlp, *holdout))
        example = holdout[0][:4]
        for name, logger in (("tabular-mlp", log_torch), ("tabular-mlp-onnx", log_onnx)):
            if name in todo:
                with mlflow.start_run(run_name=name):
                    version = publish(client, name, todo[name], logger(mlp, example))
                log.info("registered %s version %s as @%s", name, version, ALIAS)
    if "image-cnn" in todo:
        x, y = nets.image_data(2_000, seed=3)
        cnn = nets.train(nets.ImageCNN(), x, y, steps=120, batch=64, seed=3)
        holdout = nets.image_data(200, seed=4)
        log.info("image-cnn trained: holdout accuracy %.3f", nets.accuracy(cnn, *holdout))
        with mlflow.start_run(run_name="image-cnn"):
            version = publish(client, "image-cnn", todo["image-cnn"], log_torch(cnn, holdout[0][:2]))
        log.info("registered image-cnn version %s as @%s", version, ALIAS)
    log.info("demo models registered in %.1fs", time.perf_counter() - started)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
