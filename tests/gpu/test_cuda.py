"""The torch and ONNX Runtime paths on CUDA. Skipped on hosts without a CUDA device (as in CI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import export_onnx, linear_module
from service.runtime.base import resolve_device
from service.runtime.torch import TorchRuntime, cuda_device_count, cuda_memory

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this host"),
]
X = np.array([[1, 2, 3, 4], [0, 0, 0, 0]], dtype=np.float32)
EXPECTED = np.repeat(2 * X.sum(axis=1, keepdims=True) + 1, 3, axis=1)


def test_auto_picks_cuda() -> None:
    assert resolve_device("auto", cuda_device_count()) == "cuda:0"


def test_torch_runtime_on_cuda_is_exact_and_frees_memory() -> None:
    runtime = TorchRuntime(linear_module(), "cuda:0", ["input"], ["output"])
    np.testing.assert_array_equal(runtime.predict_batch({"input": X})["output"], EXPECTED)
    assert cuda_memory()[0][1] > 0
    runtime.close()


def test_exported_torch_model_moves_to_cuda(tmp_path: Path) -> None:
    # MLflow's pt2 format: a module exported on a CPU, with a factory call that names the CPU.
    class Baked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = linear_module()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x) + torch.zeros(3)

    program = torch.export.export(
        Baked(), (torch.from_numpy(X),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    torch.export.save(program, tmp_path / "model.pt2")
    module = torch.export.load(tmp_path / "model.pt2").module()
    runtime = TorchRuntime(module, "cuda:0", ["input"], ["output"])
    np.testing.assert_array_equal(runtime.predict_batch({"input": X})["output"], EXPECTED)
    runtime.close()


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="this onnxruntime has no CUDA provider (install the gpu extra: onnxruntime-gpu)",
)
def test_onnx_runtime_on_cuda_uses_the_cuda_provider(tmp_path: Path) -> None:
    from service.runtime.onnx import OnnxRuntime

    runtime = OnnxRuntime(str(export_onnx(linear_module(), X, tmp_path / "m.onnx")), "cuda:0")
    assert runtime.info.providers[0] == "CUDAExecutionProvider"
    np.testing.assert_array_equal(runtime.predict_batch({"input": X})["output"], EXPECTED)
