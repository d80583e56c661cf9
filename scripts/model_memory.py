#!/usr/bin/env python3
"""What a model takes in memory beside what the memory budget counts (its files on disk), on CPU.

Exports an ONNX linear layer of N x N weights, loads it with Ferry's own ONNX runtime and prints the file
size and the process's resident memory (VmRSS) gained after the load and after one 64-row batch: the
margin to leave below a device's memory when setting ``FERRY_MEMORY__BUDGET_BYTES`` (README, More models
than memory). Run with the venv's Python from the repository root:

    .venv/bin/python scripts/model_memory.py 2048 4096
"""

from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(n: int, folder: Path) -> str:
    import torch

    from service.runtime.onnx import OnnxRuntime

    path = folder / f"linear-{n}.onnx"
    torch.onnx.export(
        torch.nn.Linear(n, n).eval(),
        (torch.zeros(1, n),),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        dynamo=False,
    )
    gc.collect()
    mib = 2**20
    before = rss()
    runtime = OnnxRuntime(str(path), "cpu", 1)
    loaded = rss()
    runtime.predict_batch({"input": np.ones((64, n), dtype=np.float32)}, None)
    ran = rss()
    runtime.close()
    return (
        f"{n}x{n}: file {path.stat().st_size / mib:.1f} MiB, RSS +{(loaded - before) / mib:.1f} MiB "
        f"after the load, +{(ran - before) / mib:.1f} MiB after a 64-row batch"
    )


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [2048, 4096]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            print(measure(n, Path(tmp)), flush=True)


if __name__ == "__main__":
    main()
