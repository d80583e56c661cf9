"""Turn decoded request values into arrays that match a model's signature, or say precisely why not.

Every protocol (``/predict``, ``/v2``, ``/invocations``) ends here before a request joins a batch, so
one bad input is refused with a 422 naming the input, what was expected and what was received, and
never reaches (or disturbs) its neighbours in a batch.

This is the one place that checks an array against a dtype: which kinds it may have (``check_kind``),
integer ranges and float overflow on the way to that dtype (``cast``), and, against a ``TensorSpec``, the
rank and fixed axes too (``check_array``). A protocol words these problems its own way (``Wording``): the
Open Inference Protocol's codec (``api/tensors.py``) uses the same checks for a tensor's declared
datatype, then ``check_array`` for the signature. ``DATATYPES`` is the one table of dtypes by name.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, NoReturn

import numpy as np

from service.errors import InvalidInput
from service.runtime.base import TensorSpec

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
"""The Open Inference Protocol's datatypes and their numpy dtypes (in the byte order its binary data
arrives in); every other dtype (strings, objects) is ``BYTES`` there."""

_BY_DTYPE = {(dtype.kind, dtype.itemsize): name for name, dtype in DATATYPES.items() if name != "BYTES"}

_ACCEPTS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b", "c": "fiuc"}
"""Which numpy kinds a decoded array may have for each kind of dtype it is to become: integers are valid
floats, not the reverse; any other kind takes its own kind only."""

_MAX_DEPTH = 64
"""numpy's most dimensions: it reads no list nested deeper (and refuses such a value)."""
_SMALL = 4096
"""Up to this many floats, narrowing checks their range first (two operations): cheaper than
``np.errstate`` and checking the result, as it is for more."""
_MANY = 2048
"""From this many numbers on, a list of them is built as float64 directly when it can be."""
_INT64 = 2.0**63


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The Open Inference Protocol datatype of a numpy dtype (strings and objects are ``BYTES``)."""
    return _BY_DTYPE.get((dtype.kind, dtype.itemsize), "BYTES")


@dataclass(frozen=True, slots=True)
class Wording:
    """How a protocol words what ``check_kind`` and ``cast`` refuse: templates formatted with ``name``,
    ``label`` (``label(dtype)``), ``got`` (``received`` by kind, else the dtype's name), ``min``, ``max`` and
    ``largest``."""

    label: Callable[[np.dtype[Any]], str]
    kind: str
    received: Mapping[str, str]
    out_of_range: str
    too_large: str
    kind_details: bool = False
    """Whether the kind's refusal carries ``expected`` and ``received`` in its details."""
    int_overflow: bool = False
    """Whether integers narrowed to a float that cannot hold them (100000 as float16) are refused too."""


FERRY = Wording(
    label=operator.attrgetter("name"),
    kind="input {name!r}: expected {label} values, got {got}",
    received={"U": "strings", "S": "bytes", "O": "non-numeric values (null, objects or mixed types)"},
    out_of_range="input {name!r}: a value is out of range for {label} ({min}..{max})",
    too_large="input {name!r}: a value is too large for {label} (largest is {largest:.6g})",
    kind_details=True,
)
"""The words of a check against the signature, on every protocol."""


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
    """Map ``inputs`` (a nested list for one input, or ``{name: nested list}``) to arrays of a tensor
    signature (``service.columns.decode_inputs`` takes every signature: tables, and none).

    Returns the arrays in signature order and their shared row count.
    """
    if isinstance(raw, Mapping):
        names = {s.name for s in specs}
        extra = sorted(set(raw) - names)
        if extra:
            raise InvalidInput(
                f"unknown input(s) {extra}; the model takes {sorted(names)}",
                unknown=extra,
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
        value, guard = value.original(), False  # numbers only
    else:
        guard = spec.dtype.kind not in "OU"  # a dtype that takes no strings
    if isinstance(value, (str, bytes, bool, int, float)) or value is None:
        raise InvalidInput(
            f"input {spec.name!r}: expected a list of rows with shape {shape_text(spec.shape)}, "
            f"got a single {type(value).__name__}",
            input=spec.name,
        )
    try:
        array = json_array(value, guard)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"input {spec.name!r}: rows have different lengths (ragged); expected shape "
            f"{shape_text(spec.shape)}",
            input=spec.name,
        ) from None
    return check_array(spec, array)


def check_array(
    spec: TensorSpec, array: np.ndarray, *, finite: bool = False, wording: Wording = FERRY
) -> np.ndarray:
    """Check kind, shape and range of an array against the spec; convert it to the spec's dtype.
    ``finite``: refuse NaN and infinity too (``check_finite``)."""
    name, dtype = spec.name, spec.dtype
    if array.dtype.kind not in _ACCEPTS.get(dtype.kind, dtype.kind):
        _refuse_kind(name, array, dtype, wording)
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
    array = np.ascontiguousarray(array) if array.dtype == dtype else _convert(name, array, dtype, wording)
    if finite:
        check_finite(spec, array)
    return array


def check_kind(name: str, array: np.ndarray, dtype: np.dtype[Any], wording: Wording = FERRY) -> None:
    """Refuse an array whose kind cannot become ``dtype`` (strings for numbers, floats for integers...)."""
    if array.dtype.kind not in _ACCEPTS.get(dtype.kind, dtype.kind):
        _refuse_kind(name, array, dtype, wording)


def _refuse_kind(name: str, array: np.ndarray, dtype: np.dtype[Any], wording: Wording) -> NoReturn:
    got = wording.received.get(array.dtype.kind, array.dtype.name)
    label = wording.label(dtype)
    details = {"expected": label, "received": got} if wording.kind_details else {}
    raise InvalidInput(wording.kind.format(name=name, label=label, got=got), input=name, **details)


def cast(name: str, array: np.ndarray, dtype: np.dtype[Any], wording: Wording = FERRY) -> np.ndarray:
    """An array of a kind ``check_kind`` accepts, as ``dtype`` (itself when it has it): integers must fit
    an integer dtype, and a finite float must stay finite in a narrower float."""
    return array if array.dtype == dtype else _convert(name, array, dtype, wording)


def _convert(name: str, array: np.ndarray, dtype: np.dtype[Any], wording: Wording) -> np.ndarray:
    source = array.dtype
    kind = dtype.kind
    if kind == "f":
        if source.itemsize > dtype.itemsize and (source.kind == "f" or wording.int_overflow):
            size = array.size
            if (
                0 < size <= _SMALL
                and source.kind == "f"
                and np.maximum.reduce(np.abs(array), axis=None) <= _largest(dtype)
            ):
                return array.astype(dtype)  # in range (NaN is not), so nothing overflows
            with np.errstate(over="ignore", invalid="ignore"):
                converted = array.astype(dtype)
            if not np.isfinite(converted).all() and np.isfinite(array).all():
                largest = np.finfo(dtype).max
                message = wording.too_large.format(name=name, label=wording.label(dtype), largest=largest)
                raise InvalidInput(message, input=name)
            return converted
    elif kind in "iu" and source.kind in "iu":
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):  # empty: nothing to check
            message = wording.out_of_range.format(
                name=name, label=wording.label(dtype), min=info.min, max=info.max
            )
            raise InvalidInput(message, input=name)
    return array.astype(dtype)


@functools.cache
def _largest(dtype: np.dtype[Any]) -> float:
    return float(np.finfo(dtype).max)


def json_array(value: Any, guard: bool = False) -> np.ndarray:
    """``np.array(value)`` of a decoded JSON value (``ValueError`` when it is ragged).

    ``guard`` is for a dtype that takes no strings: numpy sizes a string array by its longest
    string (``["a" * 100000, 1.0, 2.0]`` takes 1.2 MB, and 10,000 numbers beside it 4 GB) only for the
    kind check to refuse it. So a list is first summed (in C: ``sum`` stops at the first string, null
    or object). One that holds a string becomes a stand-in of its shape and of kind ``U`` (strings), with
    nothing in it; with objects or nulls among its strings, numpy's object array (references, no copies).
    """
    if not guard or type(value) is not list:
        return np.array(value)
    numbers = _numbers(value)
    if numbers is None:
        zeroed = _strings_zeroed(value, 1)
        if zeroed is None:
            return np.array(value)
        probe = np.array(zeroed)  # value's shape (or ValueError); objects where value has objects
        if probe.dtype.kind == "O":
            return np.array(value)
        return np.broadcast_to(np.array("", dtype="U1"), probe.shape)
    total, count = numbers
    if type(total) is float and count >= _MANY:
        # Numbers, one a float at least: numpy makes them float64 (unless an integer is beyond 64 bits:
        # objects), and faster when told so.
        floats = np.array(value, dtype=np.float64)
        if np.minimum.reduce(floats, axis=None) > -_INT64 and np.maximum.reduce(floats, axis=None) < _INT64:
            return floats
    return np.array(value)


def _numbers(value: list[Any]) -> tuple[int | float, int] | None:
    """The sum of the numbers in ``value`` as deep as its first number, and how many there are if it is
    regular; ``None`` when a string, null, object or list is among them. (A string less deep is where
    numpy needs a list: it refuses the value as ragged before it allocates anything.)"""
    items: Iterable[Any] = value
    count = len(value)
    first: Any = value[0] if count else None
    while type(first) is list:
        items = chain.from_iterable(items)
        count *= len(first)
        first = first[0] if first else None
    try:
        total = sum(items)
    except Exception:  # TypeError for a string, null, object or list; OverflowError for an int beyond double
        return None
    return (total, count) if type(total) in (int, float) else None


def _strings_zeroed(value: list[Any], depth: int) -> list[Any] | None:
    """A copy of ``value`` with 0 for every string as deep as numpy reads; ``None`` when it has none."""
    out: list[Any] = []
    found = False
    for item in value:
        if type(item) is str:
            item, found = 0, True
        elif type(item) is list and depth < _MAX_DEPTH:
            zeroed = _strings_zeroed(item, depth + 1)
            if zeroed is not None:
                item, found = zeroed, True
        out.append(item)
    return out if found else None


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
