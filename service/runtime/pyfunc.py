"""Any other MLflow model, through its ``pyfunc`` ``predict``, on CPU.

Ferry does not import mlflow here (the registry owns mlflow): it receives the loaded model's
``predict`` callable. A model with a DataFrame signature (``table``) gets the pandas DataFrame MLflow's
scoring server would build: the request's columns in signature order; a model without a signature gets
a DataFrame of the columns sent, or the array itself when rows were sent (``columns.POSITIONAL``).

Whatever ``predict`` returns (an ndarray, a Series, a DataFrame, a list, a dict of arrays or lists) is
normalised to ``{output: array}`` with the rows first, and ``output_form`` remembers its kind so that
each protocol renders it as MLflow does (``OutputForm``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from service.columns import POSITIONAL
from service.errors import InvalidInput, ModelRejected
from service.runtime.base import TENSORS, OutputForm, RuntimeInfo

_REJECTED = (ValueError, TypeError, KeyError, IndexError)
"""What a model raises on input it cannot take (pandas, scikit-learn, numpy and MLflow's schema
enforcement all raise these): the client's error, once the request ran alone (``batcher.py``)."""
_MLFLOW_INPUT_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST"})


class PyfuncRuntime:
    """Calls ``predict(array)`` (one input), ``predict({name: array})`` or ``predict(DataFrame)`` (a
    table), with the request's ``params`` when it sent any, and normalises the result."""

    def __init__(
        self,
        predict: Callable[..., Any],
        input_names: Sequence[str],
        output_name: str,
        *,
        table: bool = False,
    ) -> None:
        self._predict = predict
        self._input_names = tuple(input_names)
        self._output_name = output_name
        self._table = table or not input_names
        self.output_form = TENSORS
        self.info = RuntimeInfo(runtime="mlflow.pyfunc", device="cpu")

    def predict_batch(
        self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        arg = self._argument(inputs)
        try:
            result = self._predict(arg, params=dict(params)) if params else self._predict(arg)
        except Exception as exc:
            # MLflow checks inputs and params against the signature before the model runs; its
            # MlflowException says INVALID_PARAMETER_VALUE (matched by code: this module imports no
            # mlflow). Like the errors models raise on input they cannot take, that is the client's
            # mistake: a 422 with the message, not a failed batch.
            code = getattr(exc, "error_code", None)
            message = str(getattr(exc, "message", None) or exc)
            if params and code == "INVALID_PARAMETER_VALUE" and self._input_names:
                # Ferry checked the inputs against the signature already: MLflow refused the params.
                raise InvalidInput(f"params: {message}", field="params") from None
            if code in _MLFLOW_INPUT_CODES or isinstance(exc, _REJECTED):
                raise ModelRejected(f"the model rejected the input: {message}") from exc
            raise
        return self._outputs(result)

    def _argument(self, inputs: Mapping[str, np.ndarray]) -> Any:
        if not self._table:
            return inputs[self._input_names[0]] if len(self._input_names) == 1 else dict(inputs)
        if POSITIONAL in inputs and len(inputs) == 1:
            return inputs[POSITIONAL]
        import pandas as pd

        return pd.DataFrame(dict(inputs), copy=False)

    def _outputs(self, result: Any) -> dict[str, np.ndarray]:
        if isinstance(result, Mapping):
            self.output_form = OutputForm("dict")
            return {str(k): _array(v) for k, v in result.items()}
        if hasattr(result, "columns") and hasattr(result, "to_numpy"):  # a pandas DataFrame
            self.output_form = OutputForm("frame")
            return {str(c): _array(result[c].to_numpy()) for c in result.columns}
        if hasattr(result, "to_numpy"):  # a pandas Series
            self.output_form = OutputForm("series", "0" if result.name is None else str(result.name))
            return {self._output_name: _array(result.to_numpy())}
        self.output_form = TENSORS
        return {self._output_name: _array(result)}

    def close(self) -> None:
        self._predict = _closed


def _array(value: Any) -> np.ndarray:
    """An output as an array; strings as objects (a fixed-width string array costs its longest string
    times its rows)."""
    array = np.asarray(value)
    if array.dtype.kind in "US":
        return array.astype(object)
    return array


def _closed(*_: Any, **__: Any) -> Any:
    raise RuntimeError("model was unloaded")
