"""A pyfunc model that waits for a gate (MLflow's models-from-code format), for test_hangup.py: it
appends the row count of every call to ``params["log"]`` and then, with ``params["gate"]`` set, waits
until that file exists (at most a minute). Its output is its input."""

import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class Gated(PythonModel):
    # No type hints: MLflow would take them for an input schema and warn that they are not one.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        x = np.asarray(model_input, dtype=np.float32)
        params = params or {}
        if params.get("log"):
            with open(params["log"], "a") as log:
                log.write(f"{len(x)}\n")
        if params.get("gate"):
            deadline = time.monotonic() + 60
            while not Path(params["gate"]).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return x


mlflow.models.set_model(Gated())
