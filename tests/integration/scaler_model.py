"""A pyfunc model that takes inference parameters (MLflow's models-from-code format), for test_params.py:
its output is its input times ``params["scale"]`` (default 1)."""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class Scaler(PythonModel):
    # No type hints: MLflow would take them for an input schema and warn that they are not one.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        scale = (params or {}).get("scale", 1.0)
        return np.asarray(model_input, dtype=np.float32) * np.float32(scale)


mlflow.models.set_model(Scaler())
