"""The ``Runtime`` protocol every backend implements, tensor specs, and device resolution.

A runtime takes a batch (a dict of numpy arrays sharing their first axis) and returns a dict of numpy
arrays with the same first axis. It is called from one worker thread at a time and knows nothing of
HTTP, batching or caching.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, dtype and shape of one input or output; ``-1`` marks a free axis (the batch axis first).

    A column of a DataFrame signature is a spec too: shape ``(-1,)``, ``column`` its MLflow type
    (``double``, ``long``, ``string``, ...; ``service.columns``) and ``required`` whether a request may
    leave it out."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    column: str | None = None
    required: bool = True

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "dtype": self.dtype.name, "shape": list(self.shape)}
        if self.column is not None:
            out |= {"type": self.column, "required": self.required}
        return out


@dataclass(frozen=True, slots=True)
class RuntimeInfo:
    """What a runtime reports about itself (``GET /models``, ``ferry_model_info``)."""

    runtime: str
    device: str
    providers: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class OutputForm:
    """What kind of value a model returned (``runtime.output_form``; tensor runtimes: ``TENSORS``):
    ``array`` (an ndarray or list), ``series`` (``key``: the column MLflow's records name it by),
    ``frame`` (a DataFrame: one output per column, in order), or ``dict``."""

    kind: str = "array"
    key: str = "0"


TENSORS = OutputForm()


class Runtime(Protocol):
    """A loaded model on one device."""

    info: RuntimeInfo

    def predict_batch(
        self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on one batch; every output's first axis equals the inputs' first axis.
        ``params`` are the request's inference parameters: pyfunc models take them, tensor models
        (torch, ONNX) have none and ignore them."""
        ...

    def close(self) -> None:
        """Free the model and its device memory."""
        ...


def resolve_device(requested: str, cuda_devices: int) -> str:
    """Map ``auto|cpu|cuda|cuda:N`` to a concrete ``cpu`` or ``cuda:N``.

    ``auto`` picks ``cuda:0`` when a CUDA device exists. Asking for CUDA where there is none, or for a
    device index that does not exist, is a start-up error rather than a silent CPU fallback.
    """
    if requested == "cpu" or (requested == "auto" and cuda_devices == 0):
        return "cpu"
    if requested == "auto":
        return "cuda:0"
    index = int(requested.partition(":")[2] or 0)
    if cuda_devices == 0:
        raise ConfigurationError(
            f"device {requested!r} was asked for but no CUDA device is available "
            "(no NVIDIA driver, or a CPU-only build of torch); set FERRY_DEVICE=cpu or auto",
            device=requested,
        )
    if index >= cuda_devices:
        raise ConfigurationError(
            f"device {requested!r} does not exist: this host has {cuda_devices} CUDA device(s)",
            device=requested,
        )
    return f"cuda:{index}"
