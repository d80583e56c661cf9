"""A pyfunc model that refuses to load in one worker process (MLflow's models-from-code format), for
test_swaps_workers.py: its ``model_config`` may name a worker index (``fail_in_worker``); loading it
in the worker with that index (``_FERRY_WORKER_INDEX``) raises. Its output is its input plus
``model_config["offset"]`` (so each version's answers tell them apart)."""

import os

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class Picky(PythonModel):
    # No type hints: MLflow would take them for an input schema and warn that they are not one.
    def load_context(self, context):  # type: ignore[no-untyped-def]
        config = context.model_config or {}
        self.offset = np.float32(config.get("offset", 0))
        worker = os.environ.get("_FERRY_WORKER_INDEX")
        if worker is not None and str(config.get("fail_in_worker")) == worker:
            raise RuntimeError(f"this version does not load in worker {worker}")

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return np.asarray(model_input, dtype=np.float32) + self.offset


mlflow.models.set_model(Picky())
