"""A pyfunc classifier that answers string labels (MLflow's models-from-code format), for
test_cache_auth.py: ``"pos"`` for a row whose sum is positive, ``"neg"`` otherwise."""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class Labeler(PythonModel):
    # No type hints: MLflow would take them for an input schema and warn that they are not one.
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        sums = np.asarray(model_input, dtype=np.float32).sum(axis=1)
        return np.where(sums > 0, "pos", "neg").astype(object)


mlflow.models.set_model(Labeler())
