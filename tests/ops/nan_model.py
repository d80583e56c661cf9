"""A pyfunc model (MLflow's models-from-code format) whose every output is NaN, for test_readme.py: its
warm-up fails, so a Ferry following its alias rejects it."""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class Nan(PythonModel):
    # No type hints: MLflow would take them for an input schema and warn that they are not one.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return np.full(np.asarray(model_input).shape, np.nan, dtype=np.float32)


mlflow.models.set_model(Nan())
