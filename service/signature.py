"""Turn decoded request values into arrays that match a model's signature, or say precisely why not.

Every protocol (``/predict``, ``/v2``, ``/invocations``) ends here before a request joins a batch, so
one bad input is refused with a 422 naming the input, what was expected and what was received, and
never reaches (or disturbs) its neighbours in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidInput
from service.runtime.base import TensorSpec

# Which numpy kinds a JSON-decoded array may have for each kind of declared dtype.
_ACCEPTS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b", "c": "fiuc"}


@dataclass(frozen=True, slots=True)
class DecodedArray:
    """A regular JSON array of numbers that the API decoded straight to float64 (``api/jsonbody.py``),
    with the JSON value it came from on demand, for inputs whose type is not floating point (JSON's
    ``1`` and ``1.0`` are the same double, and integers above 2**53 are not)."""

    values: np.ndarray
    original: Callable[[], Any]


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("-1" if d < 0 else str(d) for d in shape) + "]"


def decode_inputs(specs: Sequence[TensorSpec], raw: Any) -> tuple[dict[str, np.ndarray], int]:
    """Map ``inputs`` (a nested list for one input, or ``{name: nested list}``) to arrays.

    Returns the arrays in signature order and their shared row count.
    """
    if isinstance(raw, Mapping):
        names = {s.name for s in specs}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise InvalidInput(
                f"unknown input(s) {unknown}; the model takes {sorted(names)}",
                unknown=unknown,
                expected=sorted(names),
            )
        missing = [s.name for s in specs if s.name not in raw]
        if missing:
            raise InvalidInput(f"missing input(s) {missing}", missing=missing)
        values = {s.name: to_array(s, raw[s.name]) for s in specs}
    elif len(specs) == 1:
        values = {specs[0].name: to_array(specs[0], raw)}
    else:
        raise InvalidInput(
            f"the model takes {len(specs)} inputs: send inputs as an object {{name: values}} with "
            f"{[s.name for s in specs]}",
            expected=[s.name for s in specs],
        )
    return values, shared_rows(values)


def to_array(spec: TensorSpec, value: Any) -> np.ndarray:
    """One input's JSON value to an array of the spec's dtype and shape."""
    if isinstance(value, DecodedArray):
        if spec.dtype.kind == "f":
            return check_array(spec, value.values)
        value = value.original()
    if isinstance(value, (str, bytes, bool, int, float)) or value is None:
        raise InvalidInput(
            f"input {spec.name!r}: expected a list of rows with shape {shape_text(spec.shape)}, "
            f"got a single {type(value).__name__}",
            input=spec.name,
        )
    try:
        array = np.array(value)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"input {spec.name!r}: rows have different lengths (ragged); expected shape "
            f"{shape_text(spec.shape)}",
            input=spec.name,
        ) from None
    return check_array(spec, array)


def check_array(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """Check kind, shape and range of an array against the spec; convert it to the spec's dtype."""
    name, dtype = spec.name, spec.dtype
    if array.dtype.kind not in _ACCEPTS.get(dtype.kind, dtype.kind):
        got = {"U": "strings", "S": "bytes", "O": "non-numeric values (null, objects or mixed types)"}.get(
            array.dtype.kind, array.dtype.name
        )
        raise InvalidInput(
            f"input {name!r}: expected {dtype.name} values, got {got}",
            input=name,
            expected=dtype.name,
            received=got,
        )
    if array.ndim != len(spec.shape) or any(
        want >= 0 and got != want for want, got in zip(spec.shape[1:], array.shape[1:], strict=False)
    ):
        hint = "; wrap a single row in a list" if array.ndim == len(spec.shape) - 1 else ""
        raise InvalidInput(
            f"input {name!r}: expected shape {shape_text(spec.shape)} (rows first), got "
            f"{shape_text(array.shape)}{hint}",
            input=name,
            expected=list(spec.shape),
            received=list(array.shape),
        )
    if array.shape[0] == 0:
        raise InvalidInput(f"input {name!r}: no rows (empty batch)", input=name)
    if array.dtype == dtype:
        return np.ascontiguousarray(array)
    if dtype.kind == "f" and array.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            converted = array.astype(dtype)
        if not np.isfinite(converted).all() and np.isfinite(array).all():
            raise InvalidInput(
                f"input {name!r}: a value is too large for {dtype.name} "
                f"(largest is {np.finfo(dtype).max:.6g})",
                input=name,
            )
        return converted
    if dtype.kind in "iu" and array.dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(
                f"input {name!r}: a value is out of range for {dtype.name} ({info.min}..{info.max})",
                input=name,
            )
    return array.astype(dtype)


def shared_rows(values: Mapping[str, np.ndarray]) -> int:
    rows = {name: a.shape[0] for name, a in values.items()}
    counts = set(rows.values())
    if len(counts) > 1:
        raise InvalidInput(f"inputs disagree on the number of rows: {rows}", rows=rows)
    return int(counts.pop())


def check_finite(spec: TensorSpec, array: np.ndarray) -> None:
    """Refuse NaN and infinity (JSON cannot carry them; binary protocols can)."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"input {spec.name!r}: NaN or infinite values are not accepted", input=spec.name)
