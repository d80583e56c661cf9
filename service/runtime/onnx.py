"""ONNX Runtime backend: one ``InferenceSession`` on CUDA or CPU.

The only module of Ferry that imports onnxruntime. On CUDA the session asks for the CUDA execution
provider and fails at start-up if it is not active (no silent CPU fallback); the active providers are
reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from service.errors import ConfigurationError
from service.runtime.base import RuntimeInfo, TensorSpec

_ONNX_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


class OnnxRuntime:
    """Runs an ONNX file with ONNX Runtime."""

    def __init__(self, path: str, device: str, intra_op_threads: int = 1) -> None:
        options = ort.SessionOptions()
        if intra_op_threads > 0:
            options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels torch brings
                ort.preload_dlls()
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigurationError(
                    f"device {device!r} needs onnxruntime's CUDAExecutionProvider, which this install "
                    "lacks: install Ferry with the 'gpu' extra (onnxruntime-gpu)",
                    device=device,
                )
        self._session = ort.InferenceSession(path, sess_options=options, providers=providers)
        active = tuple(self._session.get_providers())
        if device.startswith("cuda") and "CUDAExecutionProvider" not in active:
            raise ConfigurationError(
                f"onnxruntime could not activate CUDA on {device}; active providers: {list(active)}",
                device=device,
            )
        self._output_names = [o.name for o in self._session.get_outputs()]
        self.info = RuntimeInfo(runtime=f"onnxruntime {ort.__version__}", device=device, providers=active)

    def input_specs(self) -> list[TensorSpec]:
        return [_spec(i) for i in self._session.get_inputs()]

    def output_specs(self) -> list[TensorSpec]:
        return [_spec(o) for o in self._session.get_outputs()]

    def predict_batch(
        self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        del self._session


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
    return TensorSpec(node.name, np.dtype(_ONNX_TYPES.get(node.type, np.float32)), shape)
