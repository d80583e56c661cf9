"""Real MLflow stores that the integration tests start: a tracking server (sqlite backend, artifacts
proxied with ``--serve-artifacts``) and a fresh PostgreSQL database. Each test module starts its own and
stops (drops) it after; PostgreSQL tests skip with the reason when nothing listens on 127.0.0.1:5432."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from procs import launch, wait_ready

from conftest import Server, export_onnx, free_port, linear_module, stop_server

POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432
POSTGRES_ADMIN_URI = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"
EXAMPLE = np.arange(8, dtype=np.float32).reshape(2, 4)
"""The input example of every model here: 2 rows of 4 features."""


def postgres_missing() -> str | None:
    """Why the PostgreSQL tests cannot run here, or ``None`` when they can."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed: pip install -e '.[postgres]' (make test installs it)"
    try:
        with socket.create_connection((POSTGRES_HOST, POSTGRES_PORT), timeout=2):
            pass
    except OSError as exc:
        return f"PostgreSQL is not reachable on {POSTGRES_HOST}:{POSTGRES_PORT}: {exc}"
    return None


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty database ``ferry_test_<random>`` (user ``postgres``, trust auth); dropped after,
    whatever connections MLflow's engines still hold."""
    import psycopg

    name = f"ferry_test_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URI, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URI, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_tracking_server(root: Path, timeout_s: float = 120.0, env: dict[str, str] | None = None) -> Server:
    """``mlflow server`` on a free port: runs and registry in ``root/mlflow.db``, artifacts proxied from
    ``root/artifacts`` (experiments created without a location get ``mlflow-artifacts:/``); returned once
    ``/health`` answers. ``env`` adds variables (``MLFLOW_*`` ones too) to its clean environment."""
    port = free_port()
    argv = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    clean["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{clean.get('PATH', '')}"
    clean |= env or {}
    server = launch(
        "mlflow-server", argv, root / f"mlflow-{port}.log", url=f"http://127.0.0.1:{port}", env=clean
    )
    try:
        wait_ready(server, "/health", timeout_s)
    except BaseException:
        stop_server(server)
        raise
    return server


@contextlib.contextmanager
def tracking(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` for a block, with no active experiment inside it:
    an experiment id set by an earlier block (``mlflow.set_experiment`` keeps it in the process and in
    the environment variable ``MLFLOW_EXPERIMENT_ID``) names an experiment of another store, and a run
    would be created there (``No Experiment with id=1 exists``). The URI and the active experiment are
    put back after."""
    import mlflow
    from mlflow.tracking import fluent

    previous, experiment = mlflow.get_tracking_uri(), fluent._active_experiment_id
    variable = os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = None
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        fluent._active_experiment_id = experiment
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        if variable is not None:
            os.environ["MLFLOW_EXPERIMENT_ID"] = variable


def save_linear(path: Path, weight: float) -> Path:
    """An ONNX model directory (``mlflow.onnx.save_model``) at ``path``: output = weight*sum(x)+1, 3
    columns; input ``input`` of 4 float32 features."""
    import mlflow
    import onnx
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(linear_module(weight), EXAMPLE, Path(tmp) / "linear.onnx")
        output = weight * EXAMPLE.sum(1, keepdims=True).repeat(3, 1) + 1
        mlflow.onnx.save_model(
            onnx.load(str(onnx_path)),
            str(path),
            signature=infer_signature({"input": EXAMPLE}, output),
            input_example={"input": EXAMPLE},
            pip_requirements=["onnx", "onnxruntime"],
        )
    return path


def log_linear(weight: float) -> str:
    """Log ``save_linear``'s model as the artifact ``model`` of a new run (MLflow's current tracking URI
    and experiment); its ``runs:/`` URI."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run() as run:
        mlflow.log_artifacts(str(save_linear(Path(tmp) / "model", weight)), "model")
    return f"runs:/{run.info.run_id}/model"


def register(name: str, model_uri: str, alias: str | None = None) -> str:
    """Register ``model_uri`` as a new version of ``name`` (with ``alias``, if given); its number."""
    import mlflow
    from mlflow.tracking import MlflowClient

    version = str(mlflow.register_model(model_uri, name).version)
    if alias is not None:
        MlflowClient().set_registered_model_alias(name, alias, version)
    return version
