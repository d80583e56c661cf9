"""A pyfunc model whose loading can be held at a gate (MLflow's models-from-code format), for
test_load_race.py. MLflow runs this file when it loads the model. With ``SLOW_LOAD_DIR`` set, each load
appends a line to ``$SLOW_LOAD_DIR/loads`` and, after handing its model to MLflow, waits until the file
``$SLOW_LOAD_DIR/open`` exists (at most a minute): a load held in progress, at the point where MLflow's
process-wide hand-over (``set_model``) is most fragile. Its output is its input times 2."""

import os
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class Doubler(PythonModel):
    # No type hints: MLflow would take them for an input schema and warn that they are not one.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return np.asarray(model_input, dtype=np.float32) * np.float32(2)


mlflow.models.set_model(Doubler())

if os.environ.get("SLOW_LOAD_DIR"):
    folder = Path(os.environ["SLOW_LOAD_DIR"])
    with (folder / "loads").open("a") as loads:
        loads.write("load\n")
    deadline = time.monotonic() + 60
    while not (folder / "open").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
