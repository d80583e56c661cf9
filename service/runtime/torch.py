"""PyTorch backend: an ``nn.Module`` (eager or ``torch.export``-ed) in eval mode on one device.

The only module of Ferry that imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from service.runtime.base import RuntimeInfo


def cuda_device_count() -> int:
    """CUDA devices torch can use (0 on a CPU-only build or a host without a driver)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def set_cpu_threads(threads: int) -> None:
    """Bound torch's intra-op threads (0 keeps torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def cuda_memory() -> list[tuple[str, int, int]]:
    """(device, allocated bytes, reserved bytes) for each CUDA device, for the GPU collector."""
    return [
        (f"cuda:{i}", torch.cuda.memory_allocated(i), torch.cuda.memory_reserved(i))
        for i in range(cuda_device_count())
    ]


class TorchRuntime:
    """Calls ``module(*inputs)`` under ``torch.inference_mode`` and returns numpy arrays."""

    def __init__(
        self,
        module: Any,
        device: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
    ) -> None:
        self._device = torch.device(device)
        if _is_exported(module):
            if self._device.type != "cpu":
                module = move_exported(module, self._device)
        elif hasattr(module, "to"):
            module = module.to(self._device)
            if hasattr(module, "eval"):
                module.eval()
        self._module = module
        self._input_names = tuple(input_names)
        self._output_names = tuple(output_names)
        self.info = RuntimeInfo(runtime=f"torch {torch.__version__}", device=device)

    def predict_batch(
        self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        cuda = self._device.type == "cuda"
        args = [
            torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self._device, non_blocking=cuda)
            for name in self._input_names
        ]
        with torch.inference_mode():
            result = self._module(*args)
        return self._to_numpy(result)

    def _to_numpy(self, result: Any) -> dict[str, np.ndarray]:
        if isinstance(result, torch.Tensor):
            tensors: list[Any] = [result]
        elif isinstance(result, Mapping):
            return {str(k): v.detach().cpu().numpy() for k, v in result.items()}
        else:
            tensors = list(result)
        names = self._output_names
        if len(names) != len(tensors):
            names = tuple(f"output_{i}" for i in range(len(tensors))) if len(tensors) > 1 else ("output",)
        return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors, strict=True)}

    def close(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def _is_exported(module: Any) -> bool:
    # What ``torch.export.load(...).module()`` returns (MLflow's ``pt2`` format); eval() is refused.
    return type(module).__name__ in {"GraphModule"} and hasattr(module, "_in_spec")


def move_exported(module: Any, device: torch.device) -> Any:
    """Move a ``torch.export``-ed module: ``.to()`` moves its parameters and buffers, but the graph also
    holds tensor constants and factory calls with the export's device baked in (``zeros(device=cpu)``),
    which would meet CUDA inputs with CPU tensors. MLflow loads such a model on the device it was saved
    from only, so a model exported on a CPU would otherwise never run on CUDA."""
    module = module.to(device)
    for node in module.graph.nodes:
        if node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            parent = module.get_submodule(owner) if owner else module
            value = getattr(parent, attr)
            if isinstance(value, torch.Tensor) and value.device != device:
                setattr(parent, attr, value.to(device))
        baked = node.kwargs.get("device")
        if isinstance(baked, (torch.device, str)) and torch.device(baked) != device:
            node.update_kwarg("device", device)
    module.recompile()
    return module
