"""Any other MLflow model, through its ``pyfunc`` ``predict``, on CPU.

Ferry does not import mlflow here (the registry owns mlflow): it receives the loaded model's
``predict`` callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from service.errors import InvalidInput
from service.runtime.base import RuntimeInfo


class PyfuncRuntime:
    """Calls ``predict(array)`` (one input) or ``predict({name: array})``, with the request's ``params``
    when it sent any, and normalises the result."""

    def __init__(self, predict: Callable[..., Any], input_names: Sequence[str], output_name: str) -> None:
        self._predict = predict
        self._input_names = tuple(input_names)
        self._output_name = output_name
        self.info = RuntimeInfo(runtime="mlflow.pyfunc", device="cpu")

    def predict_batch(
        self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        arg: Any = inputs[self._input_names[0]] if len(self._input_names) == 1 else dict(inputs)
        try:
            result = self._predict(arg, params=dict(params)) if params else self._predict(arg)
        except Exception as exc:
            # MLflow checks params against the signature's params schema before the model runs; its
            # MlflowException says INVALID_PARAMETER_VALUE (matched by code: this module imports no
            # mlflow). That is the client's mistake: a 422 naming the field, not a failed batch.
            if params and getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
                raise InvalidInput(f"params: {getattr(exc, 'message', exc)}", field="params") from None
            raise
        if isinstance(result, Mapping):
            return {str(k): np.asarray(v) for k, v in result.items()}
        if hasattr(result, "to_numpy"):  # pandas DataFrame or Series
            result = result.to_numpy()
        return {self._output_name: np.asarray(result)}

    def close(self) -> None:
        self._predict = _closed


def _closed(*_: Any, **__: Any) -> Any:
    raise RuntimeError("model was unloaded")
