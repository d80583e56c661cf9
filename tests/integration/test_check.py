"""``ferry check`` as a user runs it: a subprocess against a real sqlite MLflow registry holding real
registered versions, judged by the default policy or a policy file, with the report files read back.

The registry (built once for this module):

- ``mlp`` (ONNX, a tensor model; input ``input`` [-1, 64], output ``output``): version 1 is the demo MLP
  trained on ``nets.tabular_data`` (``champion``); 2 is the same network registered again; 3 the same
  architecture trained on shuffled labels (an accuracy regression); 4 the trained network plus a wide
  branch (64 -> 2048 -> 2048 -> 2048) whose head has zero weights, so its answers are version 1's and
  it is many times slower (a latency regression); 5 version 1's first 5 logits only (an output-shape
  regression).
- ``churn`` (scikit-learn pipeline over a DataFrame, ``models/tabular.py``): version 1 trained on
  ``churn_frame(seed=0)`` (``champion``); 2 retrained on another sample (``seed=1``: agrees on about
  95% of rows, accuracy within 0.01); 3 trained on shuffled labels.
- ``cnn`` (ONNX, untrained ``nets.ImageCNN``; input [-1, 3, 64, 64]): run on JSON lines whose
  ``input`` column holds each row's image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import ROOT, TEST_FLAVORS, export_onnx, log_onnx

pytestmark = pytest.mark.integration

SKLEARN_FLAVORS = TEST_FLAVORS + ",sklearn"
LATENCY_IS_ANOTHER_TEST = "min_p99_increase_ms = 1000.0\n"
"""Policy line of the tests that judge outputs: a latency check is not theirs (no timing assertions)."""


class CheckRegistry:
    def __init__(self, root: Path, uri: str) -> None:
        self.root, self.uri = root, uri
        self.mlp_data = root / "mlp.parquet"
        self.churn_data = root / "churn.csv"
        self.images = root / "images.jsonl"


def _register(name: str, info: Any, alias: str | None = None) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    version = mlflow.register_model(info.model_uri, name)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)


def _onnx(
    module: Any, example: np.ndarray, experiment: str, name: str, tmp: Path, alias: str | None = None
) -> None:
    import mlflow
    import torch

    path = export_onnx(module.eval(), example, tmp / f"{name}.onnx")
    with torch.inference_mode():
        output = module(torch.from_numpy(example)).numpy()
    with mlflow.start_run(experiment_id=experiment):
        _register(name, log_onnx(path, example, output), alias)


@pytest.fixture(scope="module")
def check_registry(tmp_path_factory: pytest.TempPathFactory) -> CheckRegistry:
    import mlflow
    import nets
    import tabular
    import torch

    root = tmp_path_factory.mktemp("check-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("check", artifact_location=(root / "artifacts").as_uri())
        x, y = nets.tabular_data(20_000, seed=1)
        mlp = nets.train(nets.TabularMLP(), x, y, steps=200, batch=256, seed=1)
        shuffled = nets.train(nets.TabularMLP(), x, np.random.default_rng(0).permutation(y), 200, 256, seed=1)
        example = x[:4]

        class Slow(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.mlp = mlp
                layers: list[torch.nn.Module] = [torch.nn.Linear(64, 2048), torch.nn.ReLU()]
                for _ in range(2):
                    layers += [torch.nn.Linear(2048, 2048), torch.nn.ReLU()]
                self.wide = torch.nn.Sequential(*layers)
                self.head = torch.nn.Linear(2048, 10)
                with torch.no_grad():
                    self.head.weight.zero_()
                    self.head.bias.zero_()

            def forward(self, v: torch.Tensor) -> torch.Tensor:
                return self.mlp(v) + self.head(self.wide(v))

        class Narrow(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.mlp = mlp

            def forward(self, v: torch.Tensor) -> torch.Tensor:
                return self.mlp(v)[:, :5]

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _onnx(mlp, example, experiment, "mlp", folder, alias="champion")
            _onnx(mlp, example, experiment, "mlp", folder)
            _onnx(shuffled, example, experiment, "mlp", folder)
            _onnx(Slow(), example, experiment, "mlp", folder)
            _onnx(Narrow(), example, experiment, "mlp", folder)
            torch.manual_seed(0)
            _onnx(
                nets.ImageCNN().eval(), nets.image_data(2, seed=4)[0], experiment, "cnn", folder, "champion"
            )

        mlflow.set_experiment(experiment_id=experiment)
        for alias, model in (
            ("champion", tabular.train_churn_sklearn(2000, seed=0)[0]),
            (None, tabular.train_churn_sklearn(2000, seed=1)[0]),
            (None, _shuffled_churn()),
        ):
            with mlflow.start_run(experiment_id=experiment):
                _register("churn", tabular.log_churn_sklearn(model=model), alias)
        with mlflow.start_run(experiment_id=experiment):
            _register("churn-code", tabular.log_churn_code(), "champion")
    finally:
        mlflow.set_tracking_uri(previous)

    registry = CheckRegistry(root, uri)
    import pandas as pd

    features, labels = nets.tabular_data(1000, seed=5)
    frame = pd.DataFrame(features, columns=[f"f{i}" for i in range(64)])
    frame.assign(label=labels).to_parquet(registry.mlp_data)
    churn, churned = tabular.churn_frame(1000, seed=7)
    churn.insert(0, "customer_id", [f"c{i:04d}" for i in range(len(churn))])  # a column no model takes
    churn.assign(churned=churned).to_csv(registry.churn_data, index=False)
    images, classes = nets.image_data(12, seed=6)
    with registry.images.open("w") as out:
        for image, label in zip(images, classes, strict=True):
            out.write(json.dumps({"input": image.round(4).tolist(), "label": int(label)}) + "\n")
    return registry


def _shuffled_churn() -> Any:
    import tabular

    x, y = tabular.churn_frame(2000, seed=0)
    return tabular.churn_pipeline().fit(x, y.sample(frac=1.0, random_state=3).to_numpy())


def ferry_check(
    registry: CheckRegistry, workdir: Path, *args: str, flavors: str = TEST_FLAVORS, requests: int = 30
) -> tuple[int, str, str, Path]:
    """Run ``ferry check`` (``python -m service check``) from ``workdir``: status, stdout, stderr and the
    report folder."""
    report = workdir / "report"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "MLFLOW_"))}
    env |= {
        "MLFLOW_TRACKING_URI": registry.uri,
        "FERRY_DOWNLOAD_DIR": str(registry.root / "downloads"),
        "FERRY_ALLOWED_FLAVORS": flavors,
        "PYTHONPATH": str(ROOT),
    }
    if "sklearn" in flavors:
        env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
    argv = [
        sys.executable,
        "-m",
        "service",
        "check",
        *args,
        "--report",
        str(report),
        "--requests",
        str(requests),
    ]
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr, report


def read_report(report: Path) -> dict[str, Any]:
    for name in ("report.md", "report.json", "latency.svg"):
        assert (report / name).is_file(), f"{name} missing from {report}"
    result: dict[str, Any] = json.loads((report / "report.json").read_text())
    return result


def failed(result: dict[str, Any]) -> list[str]:
    return [c["name"] for c in result["checks"] if not c["passed"]]


def policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------------------------- tensor models (ONNX)
def test_the_same_network_registered_again_passes_against_the_champion(
    check_registry: CheckRegistry, tmp_path: Path
) -> None:
    rc, out, err, report = ferry_check(
        check_registry, tmp_path, "models:/mlp/2", "--data", str(check_registry.mlp_data), "--label", "label",
        "--policy", policy(tmp_path, LATENCY_IS_ANOTHER_TEST),
    )  # fmt: skip
    assert rc == 0, out + err
    result = read_report(report)
    assert result["passed"] is True and failed(result) == []
    assert (
        result["candidate"]["version"] == "2" and result["against"]["version"] == "1"
    )  # the default: champion
    assert result["against"]["uri"] == "models:/mlp@champion"
    assert result["data"]["rows"] == 1000 and result["data"]["label"] == "label"
    agreement = result["agreement"]["output"]
    assert (
        agreement["kind"] == "scores" and agreement["agreement"] == 1.0 and agreement["max_abs_diff"] == 0.0
    )
    assert result["candidate"]["accuracy"] == result["against"]["accuracy"] > 0.8
    for side in ("candidate", "against"):
        latency = result[side]["latency"]
        assert set(latency) == {"batch_1", "batch_64"}  # FERRY_BATCH__MAX_ROWS' default
        assert latency["batch_64"]["rows"] == 64 and latency["batch_1"]["requests"] == 30
        assert 0 < latency["batch_1"]["p50_ms"] <= latency["batch_1"]["p99_ms"]
        assert latency["batch_64"]["rows_per_s"] > 0
        assert result[side]["load_s"] > 0 and result[side]["flavor"] == "onnx"
    assert {c["name"] for c in result["checks"]} >= {"outputs", "agreement.output", "accuracy_drop"}
    markdown = (report / "report.md").read_text()
    assert markdown.startswith("# ferry check: PASSED")
    assert "| `agreement.output` | pass | 1 | 0.99 |" in markdown
    assert f"{result['candidate']['accuracy']:.4g}" in markdown
    assert "checks: " in out and "0 failed" in out and str(report / "report.json") in out


def test_a_network_trained_on_shuffled_labels_fails_accuracy_and_agreement(
    check_registry: CheckRegistry, tmp_path: Path
) -> None:
    rc, out, _, report = ferry_check(
        check_registry, tmp_path, "models:/mlp/3", "--against", "champion",
        "--data", str(check_registry.mlp_data), "--label", "label",
        "--policy", policy(tmp_path, LATENCY_IS_ANOTHER_TEST),
    )  # fmt: skip
    assert rc == 1, out
    result = read_report(report)
    assert set(failed(result)) == {"accuracy_drop", "agreement.output"}
    drop = next(c for c in result["checks"] if c["name"] == "accuracy_drop")
    assert drop["value"] == pytest.approx(result["against"]["accuracy"] - result["candidate"]["accuracy"])
    assert drop["value"] > 0.5 and drop["limit"] == 0.01
    assert "FAILED accuracy_drop:" in out and "FAILED agreement.output:" in out
    assert "| `accuracy_drop` | **FAIL** |" in (report / "report.md").read_text()


def test_a_much_wider_network_with_the_same_answers_fails_latency_only(
    check_registry: CheckRegistry, tmp_path: Path
) -> None:
    """Version 4 answers exactly what version 1 answers (a zero-weight head over a wide branch) and does
    ~8.5 million more multiply-adds per row: the default policy (p99 at most x1.5 and +1 ms) fails it."""
    rc, out, _, report = ferry_check(
        check_registry, tmp_path, "models:/mlp/4", "--data", str(check_registry.mlp_data), "--label", "label"
    )
    assert rc == 1, out
    result = read_report(report)
    assert "p99_ratio.batch_64" in failed(result)
    assert set(failed(result)) <= {"p99_ratio.batch_1", "p99_ratio.batch_64"}
    assert result["agreement"]["output"]["agreement"] == 1.0
    slow = next(c for c in result["checks"] if c["name"] == "p99_ratio.batch_64")
    mine, theirs = result["candidate"]["latency"]["batch_64"], result["against"]["latency"]["batch_64"]
    assert slow["value"] == pytest.approx(mine["p99_ms"] / theirs["p99_ms"]) and slow["limit"] == 1.5
    assert mine["rows_per_s"] < theirs["rows_per_s"]
    svg = (report / "latency.svg").read_text()
    assert svg.startswith("<svg") and f"{mine['p99_ms']:.3f} (candidate)" in svg
    assert "FAILED p99_ratio.batch_64" in out


def test_a_different_output_width_fails_the_outputs_check(
    check_registry: CheckRegistry, tmp_path: Path
) -> None:
    rc, out, _, report = ferry_check(
        check_registry, tmp_path, "models:/mlp/5", "--policy", policy(tmp_path, LATENCY_IS_ANOTHER_TEST)
    )
    assert rc == 1, out
    result = read_report(report)
    assert failed(result) == ["outputs"]
    check = result["checks"][0]
    assert check["value"] == {"output": [5]} and check["limit"] == {"output": [10]}
    assert "rows of shape [5], the compared version [10]" in check["detail"]
    assert result["data"]["source"] == "the candidate's input example" and result["data"]["rows"] == 4
    assert "output" not in result["agreement"]  # not comparable: the outputs check says why
    assert "FAILED outputs:" in out


def test_images_from_json_lines(check_registry: CheckRegistry, tmp_path: Path) -> None:
    """A JSON lines column named after the input holds each row's image (3x64x64): decoded as a
    request's tensor; the champion checked against itself."""
    rc, out, _, report = ferry_check(
        check_registry, tmp_path, "models:/cnn@champion", "--data", str(check_registry.images),
        "--label", "label", "--policy", policy(tmp_path, LATENCY_IS_ANOTHER_TEST),
    )  # fmt: skip
    assert rc == 0, out
    result = read_report(report)
    assert result["data"]["rows"] == 12 and result["agreement"]["output"]["agreement"] == 1.0
    assert result["candidate"]["signature"]["inputs"][0]["shape"] == [-1, 3, 64, 64]
    assert 0 <= result["candidate"]["accuracy"] <= 1


# ------------------------------------------------------------------------------- DataFrame models (sklearn)
def test_a_retrained_pipeline_within_the_policy_passes(check_registry: CheckRegistry, tmp_path: Path) -> None:
    rc, out, err, report = ferry_check(
        check_registry, tmp_path, "models:/churn/2", "--data", str(check_registry.churn_data),
        "--label", "churned", "--policy", policy(tmp_path, "min_agreement = 0.9\n" + LATENCY_IS_ANOTHER_TEST),
        flavors=SKLEARN_FLAVORS,
    )  # fmt: skip
    assert rc == 0, out + err
    result = read_report(report)
    agreement = result["agreement"]["output"]
    assert agreement["kind"] == "labels" and 0.9 <= agreement["agreement"] < 1.0
    assert result["data"]["ignored_columns"] == ["customer_id"]
    assert result["policy"]["min_agreement"] == 0.9 and result["policy"]["max_accuracy_drop"] == 0.01
    assert abs(result["candidate"]["accuracy"] - result["against"]["accuracy"]) <= 0.01
    assert result["candidate"]["flavor"] == "pyfunc" and result["candidate"]["label_output"] == "output"
    assert "customer_id" in (report / "report.md").read_text()


def test_a_pipeline_trained_on_shuffled_labels_fails(check_registry: CheckRegistry, tmp_path: Path) -> None:
    rc, out, _, report = ferry_check(
        check_registry, tmp_path, "models:/churn/3", "--data", str(check_registry.churn_data),
        "--label", "churned", "--policy", policy(tmp_path, LATENCY_IS_ANOTHER_TEST), flavors=SKLEARN_FLAVORS,
    )  # fmt: skip
    assert rc == 1, out
    result = read_report(report)
    assert {"accuracy_drop", "agreement.output"} <= set(failed(result))
    assert result["against"]["accuracy"] - result["candidate"]["accuracy"] > 0.1
    assert "FAILED accuracy_drop" in out


def test_a_candidate_that_does_not_load_fails_the_load_check(
    check_registry: CheckRegistry, tmp_path: Path
) -> None:
    """The scikit-learn flavor is not allowed by default: the candidate cannot be served, so it fails
    (exit 1, with a report), while the compared version loads."""
    rc, out, _, report = ferry_check(
        check_registry, tmp_path, "models:/churn/2", "--against", "models:/mlp/1", flavors="onnx,pytorch"
    )
    assert rc == 1, out
    result = read_report(report)
    assert failed(result) == ["load"]
    assert "flavor 'sklearn' is not allowed" in result["checks"][0]["detail"]
    assert "FAILED load:" in out


def test_a_candidate_that_refuses_the_data_the_champion_takes_fails_the_inputs_check(
    check_registry: CheckRegistry, tmp_path: Path
) -> None:
    """``churn-code`` needs a ``signup_date`` column the data set lacks; the compared pipeline takes it."""
    rc, out, _, report = ferry_check(
        check_registry, tmp_path, "models:/churn-code/1", "--against", "models:/churn@champion",
        "--data", str(check_registry.churn_data), "--label", "churned", flavors=SKLEARN_FLAVORS,
    )  # fmt: skip
    assert rc == 1, out
    result = read_report(report)
    assert failed(result) == ["inputs"]
    assert "missing required column(s) ['signup_date']" in result["checks"][0]["detail"]
    assert result["against"]["version"] == "1" and result["candidate"]["flavor"] == "pyfunc"


# ---------------------------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["models:/mlp/99"], "models:/mlp/99"),
        (["models:/mlp/2", "--against", "models:/nothing@champion"], "models:/nothing@champion"),
        (["models:/mlp/2", "--policy", "POLICY"], "unknown key(s) ['min_agreemnt']"),
        (["models:/mlp/2", "--data", "MLP", "--label", "churned"], "no label column 'churned'"),
        (
            ["models:/mlp/2", "--data", "CHURN", "--label", "churned"],
            "input 'input' takes rows of shape [-1, 64]",
        ),
        (["/no/such/model"], "/no/such/model"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    check_registry: CheckRegistry, tmp_path: Path, args: list[str], message: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("min_agreemnt = 0.5\n")
    paths = {"POLICY": str(bad), "MLP": str(check_registry.mlp_data), "CHURN": str(check_registry.churn_data)}
    rc, out, err, report = ferry_check(check_registry, tmp_path, *(paths.get(a, a) for a in args))
    assert rc == 2, out + err
    assert err.startswith("ferry check: ") and message in err
    assert not (report / "report.json").exists()
