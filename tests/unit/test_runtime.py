"""Runtimes on a deterministic model (nn.Linear, weight 2, bias 1) and its ONNX export: exact outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import export_onnx, linear_module
from service.errors import ConfigurationError
from service.runtime.base import resolve_device
from service.runtime.onnx import OnnxRuntime
from service.runtime.pyfunc import PyfuncRuntime
from service.runtime.torch import TorchRuntime

X = np.array([[1, 2, 3, 4], [0, 0, 0, 0], [-1, 0.5, 0.25, 0]], dtype=np.float32)
EXPECTED = np.repeat(2 * X.sum(axis=1, keepdims=True) + 1, 3, axis=1)


def test_torch_runtime_gives_exact_outputs() -> None:
    runtime = TorchRuntime(linear_module(), "cpu", ["input"], ["output"])
    out = runtime.predict_batch({"input": X})
    assert list(out) == ["output"]
    np.testing.assert_array_equal(out["output"], EXPECTED)
    assert out["output"].dtype == np.float32
    assert runtime.info.device == "cpu" and runtime.info.runtime.startswith("torch")


def test_onnx_runtime_gives_exact_outputs_and_reports_providers(tmp_path: Path) -> None:
    path = export_onnx(linear_module(), X[:2], tmp_path / "m.onnx")
    runtime = OnnxRuntime(str(path), "cpu")
    assert runtime.info.providers == ("CPUExecutionProvider",)
    [spec] = runtime.input_specs()
    assert (spec.name, spec.dtype, spec.shape) == ("input", np.dtype(np.float32), (-1, 4))
    np.testing.assert_array_equal(runtime.predict_batch({"input": X})["output"], EXPECTED)


def test_onnx_runtime_refuses_cuda_without_the_cuda_provider(tmp_path: Path) -> None:
    path = export_onnx(linear_module(), X[:2], tmp_path / "m.onnx")
    with pytest.raises(ConfigurationError, match="CUDA"):
        OnnxRuntime(str(path), "cuda:0")


def test_pyfunc_runtime_normalises_outputs() -> None:
    runtime = PyfuncRuntime(lambda a: a.sum(axis=1), ["input"], "output")
    np.testing.assert_array_equal(runtime.predict_batch({"input": X})["output"], X.sum(axis=1))


@pytest.mark.parametrize(
    ("requested", "cuda", "expected"),
    [
        ("auto", 0, "cpu"),
        ("cpu", 2, "cpu"),
        ("auto", 1, "cuda:0"),
        ("cuda", 1, "cuda:0"),
        ("cuda:1", 2, "cuda:1"),
    ],
)
def test_resolve_device(requested: str, cuda: int, expected: str) -> None:
    assert resolve_device(requested, cuda) == expected


@pytest.mark.parametrize(
    ("requested", "cuda", "message"), [("cuda", 0, "no CUDA device"), ("cuda:2", 1, "does not exist")]
)
def test_asking_for_missing_cuda_is_a_clear_start_up_error(requested: str, cuda: int, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        resolve_device(requested, cuda)
