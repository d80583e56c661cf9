"""A registry and a runtime that stand in for MLflow and a framework in process tests: ``create_app``
and ``ModelSet`` take the registry, so the pipeline and every codec run in this process (httpx's ASGI
transport) with exact, instant models. The real registry and runtimes are tested beside them
(tests/integration)."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.registry import LoadedModel, ModelRef
from service.runtime.base import RuntimeInfo, TensorSpec

X = TensorSpec("x", np.dtype(np.float32), (-1, 2))
Y = TensorSpec("y", np.dtype(np.float32), (-1, 2))


class Doubler:
    """Output ``y`` is input ``x`` times ``factor``; records every batch's row count."""

    info = RuntimeInfo(runtime="fake", device="cpu")

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor
        self.batches: list[int] = []

    def predict_batch(
        self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.batches.append(len(x))
        return {
            "y": (x * np.float32(self.factor) * np.float32((params or {}).get("scale", 1.0))).astype(
                np.float32
            )
        }

    def close(self) -> None:
        pass


class FakeRegistry:
    """Resolves every URI to ``version``; ``load`` builds a ``Doubler`` (factor: the version number),
    waits until ``gate`` is set (from a thread, as the real one runs) and records every load."""

    def __init__(self, version: str = "1", flavor: str = "pyfunc") -> None:
        self.version = version
        self.flavor = flavor
        self.gate = threading.Event()
        self.gate.set()
        self.loads: list[tuple[str, str]] = []
        self.runtimes: dict[str, Doubler] = {}
        self.fail_with: Exception | None = None
        self.discarded: list[str] = []

    def resolve(self, uri: str) -> ModelRef:
        source = f"{uri.partition('@')[0]}/{self.version}"  # models:/NAME/VERSION, as the real one
        return ModelRef(uri=uri, alias="champion", version=self.version, download_uri=source, source=source)

    def load(self, name: str, ref: ModelRef) -> LoadedModel:
        self.loads.append((name, ref.version))
        assert self.gate.wait(10), "gate never opened"
        if self.fail_with is not None:
            raise self.fail_with
        runtime = Doubler(float(ref.version))
        self.runtimes[name] = runtime
        example = {"x": np.ones((2, 2), dtype=np.float32)}
        return LoadedModel(name, ref, self.flavor, runtime, [X], [Y], example)

    def device(self) -> str:
        return "cpu"

    def discard(self, ref: ModelRef) -> None:
        self.discarded.append(ref.source)
