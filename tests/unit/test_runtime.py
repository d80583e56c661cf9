"""Runtimes on a deterministic model (nn.Linear, weight 2, bias 1) and its ONNX export: exact outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import export_onnx, linear_module
from service.errors import ConfigurationError
from service.runtime.base import resolve_device
from service.runtime.onnx import OnnxRuntime
from service.runtime.pyfunc import PyfuncRuntime
from service.runtime.torch import TorchRuntime, move_exported

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


class _Baked(torch.nn.Module):
    """A graph with a parameter, a buffer, a tensor constant and factory calls that name a device."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = linear_module()
        self.register_buffer("scale", torch.full((3,), 2.0))
        self.offset = torch.ones(3)  # a plain tensor attribute: a constant of the exported graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * self.scale + self.offset + torch.zeros(3) + torch.arange(3, device=x.device)


def _exported(tmp_path: Path) -> torch.nn.Module:
    batch = torch.export.Dim("batch")
    program = torch.export.export(_Baked(), (torch.from_numpy(X[:2]),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "model.pt2")
    return torch.export.load(tmp_path / "model.pt2").module()  # what MLflow's pt2 loader returns


def test_exported_module_runs_on_the_cpu(tmp_path: Path) -> None:
    runtime = TorchRuntime(_exported(tmp_path), "cpu", ["input"], ["output"])
    expected = (2 * X.sum(axis=1, keepdims=True) + 1) * 2 + 1 + np.arange(3)
    np.testing.assert_array_equal(runtime.predict_batch({"input": X})["output"], expected)


def test_exported_module_moves_with_its_constants_and_baked_devices(tmp_path: Path) -> None:
    # The meta device stands in for CUDA here: a module that only had .to() applied fails on it with
    # "Tensor on device cpu is not on the expected device meta" (tests/gpu runs the same on CUDA).
    module = _exported(tmp_path)
    with pytest.raises(RuntimeError, match="device"):
        module.to("meta")(torch.zeros(2, 4, device="meta"))
    moved = move_exported(_exported(tmp_path), torch.device("meta"))
    assert {t.device.type for t in moved.state_dict().values()} == {"meta"}
    out = moved(torch.zeros(5, 4, device="meta"))
    assert out.device.type == "meta" and tuple(out.shape) == (5, 3)
