"""Shared fixtures: a clean environment, a real MLflow registry with tiny deterministic models, and a real
Ferry served by uvicorn on a free 127.0.0.1 port.

Models registered (all with the alias ``champion``):
- ``linear``: torch ``nn.Linear(4, 3)`` with weight 2 and bias 1, logged as pt2 (output = 2*sum(x)+1);
  version 2 has weight 3 (output = 3*sum(x)+1) and the alias ``challenger``.
- ``linear-onnx``: the weight-2 layer exported to ONNX (input ``input``, output ``output``).
- ``tabular-mlp-onnx``: the demo MLP's architecture (64 -> 10), seeded and untrained, as ONNX.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
sys.path.insert(0, str(ROOT / "loadtests"))
import procs  # noqa: E402
from procs import RedisServer as RedisServer  # noqa: E402  (re-exported: tests import these from here)
from procs import Server as Server  # noqa: E402
from procs import free_port as free_port  # noqa: E402
from procs import poll_ready as poll_ready  # noqa: E402
from procs import stop_server as stop_server  # noqa: E402
from procs import wait_until as wait_until  # noqa: E402

_CLEARED_PREFIXES = ("FERRY_", "MLFLOW_")
TEST_FLAVORS = "onnx,pytorch,python_function"
"""What the tests' Ferry may load: the safe default (``onnx,pytorch``) and the custom pyfunc models the
tests write themselves (tests/integration/*_model.py). Tests of other flavors, and of the default, say so."""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No behaviour-changing variable from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith(_CLEARED_PREFIXES):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FERRY_ALLOWED_FLAVORS", TEST_FLAVORS)
    monkeypatch.setenv("FERRY_WORKERS", "1")  # one process per test server unless a test asks for more
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)


def linear_module(weight: float = 2.0, bias: float = 1.0, features: int = 4, outputs: int = 3):  # type: ignore[no-untyped-def]
    import torch

    layer = torch.nn.Linear(features, outputs)
    with torch.no_grad():
        layer.weight.fill_(weight)
        layer.bias.fill_(bias)
    return layer.eval()


def export_onnx(module, example: np.ndarray, path: Path) -> Path:  # type: ignore[no-untyped-def]
    import torch

    torch.onnx.export(
        module,
        (torch.from_numpy(example),),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        dynamo=False,
    )
    return path


@dataclass
class Registry:
    """A real MLflow registry (sqlite file + artifact folder) in a temporary directory."""

    root: Path
    tracking_uri: str

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}


def _register(name: str, info, alias: str | None = None) -> str:  # type: ignore[no-untyped-def]
    import mlflow
    from mlflow.tracking import MlflowClient

    version = mlflow.register_model(info.model_uri, name)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def register_code_model(
    registry: Registry,
    name: str,
    code: Path,
    example: np.ndarray,
    params: dict[str, Any],
    experiment_id: str | None = None,
) -> None:
    """Log the pyfunc model of the models-from-code file ``code`` (output shaped like its input, taking
    ``params``) and register it as ``name@champion`` in ``registry``."""
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(registry.tracking_uri)
    if experiment_id is None:  # the registry's own, whose artifacts stay under its root (not ./mlruns)
        tests = mlflow.get_experiment_by_name("tests")
        experiment_id = tests.experiment_id if tests is not None else None
    with mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(code),
            signature=infer_signature(example, example, params=params),
            input_example=example,
        )
    _register(name, info, alias="champion")


def log_torch(module, example: np.ndarray):  # type: ignore[no-untyped-def]
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.inference_mode():
        out = module(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        module,
        name="model",
        serialization_format="pt2",
        signature=infer_signature(example, out),
        input_example=example,
        pip_requirements=["torch"],
    )


def log_onnx(path: Path, example: np.ndarray, output: np.ndarray):  # type: ignore[no-untyped-def]
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    return mlflow.onnx.log_model(
        onnx.load(str(path)),
        name="model",
        signature=infer_signature({"input": example}, output),
        input_example={"input": example},
        pip_requirements=["onnx", "onnxruntime"],
    )


def build_registry(root: Path) -> Registry:
    """Create the registry described in this module's docstring under ``root`` (an empty folder) and
    leave MLflow's tracking URI pointing at it. Deterministic: the same weights, examples and version
    numbers on every call (``tests/golden`` relies on it)."""
    import mlflow
    import nets
    import torch

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("tests", artifact_location=(root / "artifacts").as_uri())
    example = np.arange(8, dtype=np.float32).reshape(2, 4)
    with mlflow.start_run(experiment_id=experiment):
        _register("linear", log_torch(linear_module(2.0), example), alias="champion")
    with mlflow.start_run(experiment_id=experiment):
        _register("linear", log_torch(linear_module(3.0), example), alias="challenger")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(linear_module(2.0), example, Path(tmp) / "linear.onnx")
        with mlflow.start_run(experiment_id=experiment):
            _register(
                "linear-onnx",
                log_onnx(path, example, 2 * example.sum(1, keepdims=True).repeat(3, 1) + 1),
                "champion",
            )
        torch.manual_seed(0)
        mlp = nets.TabularMLP().eval()
        mlp_example = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
        path = export_onnx(mlp, mlp_example, Path(tmp) / "mlp.onnx")
        with torch.inference_mode():
            mlp_out = mlp(torch.from_numpy(mlp_example)).numpy()
        with mlflow.start_run(experiment_id=experiment):
            _register("tabular-mlp-onnx", log_onnx(path, mlp_example, mlp_out), "champion")
    return Registry(root=root, tracking_uri=uri)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    yield build_registry(tmp_path_factory.mktemp("registry"))
    if previous is not None:
        mlflow.set_tracking_uri(previous)


def start_server(
    registry: Registry,
    models: str,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    wait_ready: bool = True,
) -> Server:
    """A Ferry (``python -m service serve``, run from ``workdir``) serving ``models`` from ``registry`` on a
    free port, logging to ``workdir/ferry-<port>.log``; with ``wait_ready``, once ``/health/ready`` says 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED_PREFIXES)}
    env |= registry.env() | {
        "FERRY_MODELS": models,
        "FERRY_DOWNLOAD_DIR": str(workdir / "downloads"),
        "PYTHONUNBUFFERED": "1",
        "FERRY_SHUTDOWN__GRACE_S": "0",
        "FERRY_ALLOWED_FLAVORS": TEST_FLAVORS,
        "FERRY_WORKERS": "1",
    }
    env |= extra_env or {}
    argv = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    server = procs.launch("ferry", argv, workdir / f"ferry-{port}.log", url=url, env=env, cwd=workdir)
    if wait_ready:
        wait_until_ready(server)
    return server


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``, in a /metrics text."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def wait_until_ready(server: Server, timeout_s: float = 120.0, ops_url: str | None = None) -> None:
    """Until ``/health/ready`` (on ``ops_url`` when the operations routes have their own port) says 200;
    else the server is stopped and a ``RuntimeError`` says why, with the tail of its log."""
    try:
        procs.wait_ready(server, "/health/ready", timeout_s, url=ops_url)
    except RuntimeError:
        stop_server(server)
        raise


DEFAULT_MODELS = (
    "linear=models:/linear@champion,linear-onnx=models:/linear-onnx@champion,"
    "tabular-mlp-onnx=models:/tabular-mlp-onnx@champion"
)


@pytest.fixture(scope="session")
def ferry_server(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real Ferry for the session, serving ``linear``, ``linear-onnx`` and ``tabular-mlp-onnx``."""
    server = start_server(registry, DEFAULT_MODELS, tmp_path_factory.mktemp("ferry"))
    yield server
    stop_server(server)


def fault_summary(fault: str, statuses: list[int], latencies_s: list[float]) -> str:
    """One line for the reliability report: requests sent, failed (non-200), p99 while the fault ran.
    Printed, so ``pytest -s -k 'reload or shutdown or killed'`` gives the fault table."""
    failed = sum(1 for s in statuses if s != 200)
    p99 = float(np.percentile(latencies_s, 99)) * 1000 if latencies_s else float("nan")
    line = f"FAULT {fault}: sent={len(statuses)} failed={failed} p99={p99:.1f}ms"
    print(line)
    return line


class FakeClock:
    """A clock the test moves by hand (``clock.now += 5``), for TTLs and the cache's breaker."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state_of(breaker: Any) -> Any:
    """A breaker's state, read through a call so that mypy does not narrow it between steps."""
    return breaker.state
