"""A challenger that misbehaves on demand (MLflow's models-from-code format), for test_challenger.py. It
answers as the champion of that test does (the first three features), except when a batch's first value
says otherwise: 666 raises, 777 answers five columns (another shape than the champion's three), and 555
waits until the file named by ``$CHALLENGER_GATE`` exists (at most a minute)."""

import os
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class Faulty(PythonModel):
    # No type hints: MLflow would take them for an input schema and warn that they are not one.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        x = np.asarray(model_input, dtype=np.float32)
        first = float(x[0, 0]) if x.size else 0.0
        if first == 666:
            raise RuntimeError("the challenger fails on this batch")
        if first == 777:
            return np.concatenate([x, x[:, :1]], axis=1)
        if first == 555:
            gate = Path(os.environ.get("CHALLENGER_GATE", "/nonexistent"))
            deadline = time.monotonic() + 60
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return x[:, :3].copy()


mlflow.models.set_model(Faulty())
