"""The numbers of a check, computed from arrays (no models, no I/O).

An output is one of three kinds, read from the candidate's array:

- ``labels``: integers, booleans or strings (a classifier's ``predict``): two versions agree on a row
  when its values are equal.
- ``scores``: floats with more than one column (logits, ``predict_proba``): they agree on a row when the
  argmax is the same; the absolute differences are reported too.
- ``values``: any other floats (a regression, one probability per row): they agree on a row when every
  value is within ``atol + rtol * |compared value|`` (``numpy.isclose``; NaN equals NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

QUANTILES = (0.5, 0.9, 0.99)
"""The quantiles of the absolute difference reported for float outputs (each an observed difference, not
interpolated: a difference may be infinite)."""


def output_kind(array: np.ndarray) -> str:
    """``labels``, ``scores`` or ``values`` (see the module docstring)."""
    if array.dtype.kind != "f":
        return "labels"
    if array.ndim == 2 and array.shape[1] > 1:
        return "scores"
    return "values"


def compare(candidate: np.ndarray, against: np.ndarray, *, rtol: float, atol: float) -> dict[str, Any]:
    """How one output of two versions agrees on the same rows (same shape; see ``shapes_match``):
    ``kind``, ``rows``, ``agreement`` (the share of rows that agree) and, for float outputs,
    ``max_abs_diff``, ``mean_abs_diff`` and ``abs_diff_quantiles``."""
    kind = output_kind(candidate)
    rows = int(candidate.shape[0])
    out: dict[str, Any] = {"kind": kind, "rows": rows}
    if kind == "labels" or against.dtype.kind != "f":
        same = _equal(candidate, against)
    elif kind == "scores":
        same = np.argmax(candidate, axis=1) == np.argmax(against, axis=1)
    else:
        close = np.isclose(candidate, against, rtol=rtol, atol=atol, equal_nan=True)
        same = close.reshape(rows, -1).all(axis=1)
    out["agreement"] = float(same.mean()) if rows else 1.0
    out["disagreeing_rows"] = int(rows - same.sum())
    if candidate.dtype.kind == "f" and against.dtype.kind in "fiub":
        diff = abs_diff(candidate, against)
        out["max_abs_diff"] = float(diff.max()) if diff.size else 0.0
        out["mean_abs_diff"] = float(diff.mean()) if diff.size else 0.0
        out["abs_diff_quantiles"] = {
            f"p{q * 100:g}": float(np.quantile(diff, q, method="higher")) if diff.size else 0.0
            for q in QUANTILES
        }
    return out


def abs_diff(candidate: np.ndarray, against: np.ndarray) -> np.ndarray:
    """Element-wise ``|candidate - against|`` as float64, flattened: 0 where both are NaN (or the same
    infinity), infinity where only one is NaN."""
    a = np.asarray(candidate, dtype=np.float64).ravel()
    b = np.asarray(against, dtype=np.float64).ravel()
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    same = (np.isnan(a) & np.isnan(b)) | (a == b)
    diff[same] = 0.0
    diff[np.isnan(diff)] = np.inf
    return diff


def _equal(candidate: np.ndarray, against: np.ndarray) -> np.ndarray:
    """Per row, whether every value is equal (object arrays compared value by value)."""
    rows = candidate.shape[0]
    if candidate.dtype.kind == "O" or against.dtype.kind == "O":
        a, b = candidate.reshape(rows, -1), against.reshape(rows, -1)
        return np.array(
            [all(_same(x, y) for x, y in zip(ra, rb, strict=True)) for ra, rb in zip(a, b, strict=True)]
        )
    return np.asarray(np.asarray(candidate == against).reshape(rows, -1).all(axis=1))


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, float) and isinstance(y, float) and x != x and y != y:  # both NaN
        return True
    return bool(x == y)


def shapes_match(candidate: np.ndarray, against: np.ndarray) -> bool:
    """Whether two outputs have the same shape per row (the rows themselves are the same inputs)."""
    return candidate.shape[1:] == against.shape[1:] and candidate.shape[0] == against.shape[0]


def predicted_labels(output: np.ndarray) -> np.ndarray | None:
    """A classifier's predicted label per row: the value of a ``labels`` output (one per row), the argmax
    of ``scores``; ``None`` for ``values`` (a regression: see ``mean_abs_error``)."""
    kind = output_kind(output)
    if kind == "scores":
        best: np.ndarray = np.argmax(output, axis=1)
        return best
    if kind == "labels" and (output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1)):
        return output.reshape(-1)
    return None


def label_output(outputs: dict[str, np.ndarray]) -> str | None:
    """The output compared with the labels: the first that gives labels (``predicted_labels``), else the
    first one-value-per-row ``values`` output (scored by mean absolute error), else ``None``."""
    for name, array in outputs.items():
        if predicted_labels(array) is not None:
            return name
    for name, array in outputs.items():
        if array.dtype.kind == "f" and (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)):
            return name
    return None


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """The share of rows whose predicted label equals the label. Numbers and booleans are compared as
    numbers (``True`` is 1), anything else as text (a label ``"1"`` read from a file equals 1)."""
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} predictions for {len(labels)} labels")
    if not len(labels):
        return 1.0
    if predicted.dtype.kind in "biuf" and labels.dtype.kind in "biuf":
        same = predicted.astype(np.float64) == labels.astype(np.float64)
    else:
        same = np.array([_text(p) == _text(x) for p, x in zip(predicted, labels, strict=True)])
    return float(same.mean())


def _text(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def mean_abs_error(values: np.ndarray, labels: np.ndarray) -> float:
    """The mean of ``|value - label|`` over the rows (a regression output against numeric labels)."""
    return float(np.mean(np.abs(values.reshape(-1).astype(np.float64) - labels.astype(np.float64))))


def latency(samples_s: Sequence[float], rows: int) -> dict[str, Any]:
    """Latency of ``len(samples_s)`` calls of ``rows`` rows each, run one after another: p50, p99 and
    mean in milliseconds, and throughput (rows per second of the calls' own time)."""
    times = np.asarray(samples_s, dtype=np.float64)
    total = float(times.sum())
    return {
        "rows": rows,
        "requests": int(times.size),
        "p50_ms": float(np.quantile(times, 0.5) * 1000) if times.size else None,
        "p99_ms": float(np.quantile(times, 0.99) * 1000) if times.size else None,
        "mean_ms": float(times.mean() * 1000) if times.size else None,
        "rows_per_s": rows * times.size / total if total > 0 else None,
    }
