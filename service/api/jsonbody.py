"""JSON request bodies, with the arrays of numbers that carry model inputs decoded straight to numpy.

orjson turns 256 rows of 64 floats into 16,384 Python floats and numpy then walks all of them again to
build the array: together about 560 µs of the event loop's time per request here, more than the model
call. simdjson parses the same bytes in about a third of that and hands an array over as one buffer of
doubles, so a regular array of numbers never becomes Python objects. Everything else in the body (and
every array that is not a regular array of numbers) comes out as the same Python values orjson gives;
bodies simdjson refuses (invalid JSON, numbers beyond double or 64-bit range) go to orjson, whose
answer, value or error, is the one the client gets.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection
from typing import Any

import numpy as np
import orjson
import simdjson

from service.errors import BadRequest
from service.signature import DecodedArray

_SIMDJSON_ERRORS = (ValueError, TypeError, RuntimeError, KeyError, UnicodeDecodeError)


class _Fallback(Exception):
    """Decode this body with orjson instead: duplicate keys where the walk looks keys up (a lookup finds
    the first, orjson keeps the last), or a '[' in a string (the nested-array check counts '[' bytes)."""


def parse_object(
    body: bytes,
    arrays: Collection[str] = ("inputs",),
    expected: str = "a JSON object",
    tensors: Collection[str] = (),
) -> dict[str, Any]:
    """The body as a JSON object (400 if it is not JSON, or not ``expected``). The values of the keys in
    ``arrays``, or of each key of an object there, become ``DecodedArray`` when they are regular,
    non-empty arrays of numbers; so does the ``data`` of each object in a list under a key in
    ``tensors`` (the Open Inference Protocol's ``inputs``)."""
    try:
        # A parser per body: documents of a shared parser die with its next parse, and a fresh one
        # costs about as much as a reused one.
        doc = simdjson.Parser().parse(body)
        if not isinstance(doc, simdjson.Object):
            return loads_object(body, expected)
        out, counted = _entries(doc, body, (), arrays, tensors)
    except (_Fallback, *_SIMDJSON_ERRORS):
        return loads_object(body, expected)
    if counted != body.count(b"["):
        # An array the walk above did not see: an [x] where a number should be, which flattens like x
        # (``[[1, [2]]]`` like ``[[1, 2]]``). Read such a body the plain way.
        return loads_object(body, expected)
    return out


def loads_object(body: bytes, expected: str = "a JSON object") -> dict[str, Any]:
    """The body as a JSON object with orjson (400 if it is not JSON, or not ``expected``)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        hint = " (NaN and Infinity are not JSON)" if b"NaN" in body or b"Infinity" in body else ""
        raise BadRequest(f"body is not valid JSON: {exc}{hint}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"body must be {expected}, got {type(value).__name__}")
    return value


def _python(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()  # builds a dict key by key: the last of duplicate keys wins, as in orjson
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _entries(
    obj: Any,
    body: bytes,
    path: tuple[str | int, ...],
    decode: Collection[str] | None,
    tensors: Collection[str] = (),
) -> tuple[dict[str, Any], int]:
    """An object's entries as Python values, the arrays of numbers under the keys in ``decode`` (every
    key when ``None``; one object deep) as ``DecodedArray``; and how many JSON arrays it holds."""
    keys = list(obj.keys())
    if len(set(keys)) != len(keys):
        raise _Fallback
    out: dict[str, Any] = {}
    count = 0
    for key in keys:
        # A lookup, not items() (which converts every value to Python). simdjson cannot look up a key
        # that holds a NUL character: KeyError, and orjson reads that body.
        value = obj[key]
        count += _arrays(key)
        if key in tensors and isinstance(value, simdjson.Array):
            out[key], found = _tensors(value, body, (*path, key))
            count += found
        elif decode is not None and key not in decode:
            out[key] = _python(value)
            count += _arrays(out[key])
        elif isinstance(value, simdjson.Array):
            out[key], found = _array(value, body, (*path, key))
            count += found
        elif isinstance(value, simdjson.Object) and not path:
            out[key], found = _entries(value, body, (key,), None)
            count += found
        else:
            out[key] = _python(value)
            count += _arrays(out[key])
    return out, count


def _tensors(value: Any, body: bytes, path: tuple[str | int, ...]) -> tuple[list[Any], int]:
    """A list of tensor objects with each one's ``data`` decoded; and how many JSON arrays it holds."""
    out: list[Any] = []
    count = 1
    for index, item in enumerate(value):
        if isinstance(item, simdjson.Object):
            entry, found = _entries(item, body, (*path, index), ("data",))
        else:
            entry = _python(item)
            found = _arrays(entry)
        out.append(entry)
        count += found
    return out, count


def _array(value: Any, body: bytes, path: tuple[str | int, ...]) -> tuple[Any, int]:
    """A ``DecodedArray`` when ``value`` is a regular array of numbers, else its list; and how many JSON
    arrays it holds."""
    found = _numeric(value)
    if found is None:
        if len(value) and isinstance(value[0], simdjson.Object):
            # Records (a table's rows): orjson gives the same values for the whole body in a fraction
            # of converting and counting them here (256 records of 6 columns: 2.1 ms -> 0.5 ms).
            raise _Fallback
        plain = value.as_list()
        return plain, _arrays(plain)
    array, count = found
    return DecodedArray(array, functools.partial(_original, body, *path)), count


def _numeric(array: Any) -> tuple[np.ndarray, int] | None:
    """A regular, non-empty array of numbers as float64 of its shape, and the number of JSON arrays in
    it; ``None`` for anything else (the plain path then gives the values, or the precise error)."""
    shape: list[int] = []
    node = array
    while isinstance(node, simdjson.Array):
        if len(node) == 0:
            return None
        shape.append(len(node))
        node = node[0]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    try:
        flat = np.frombuffer(array.as_buffer(of_type="d"), dtype=np.float64)
    except _SIMDJSON_ERRORS:  # a null, string or bool among the numbers
        return None
    if flat.size != math.prod(shape):
        return None
    # Every array has the length of the first one at its depth. What this cannot see is an [x] where a
    # number should be (it flattens like x): the caller compares the count of arrays returned here with
    # the '[' in the body for that.
    level = [array]
    count = 1
    for want in shape[1:]:
        below = []
        for parent in level:
            for child in parent:
                if not isinstance(child, simdjson.Array) or len(child) != want:
                    return None
                below.append(child)
        level = below
        count += len(below)
    return flat.reshape(shape), count


def _original(body: bytes, *path: str | int) -> Any:
    value: Any = orjson.loads(body)
    for key in path:
        value = value[key]
    return value


def _arrays(value: Any) -> int:
    """The JSON arrays in a plain value. A string holding '[' sends the body to orjson: it would count
    as an array in the body's bytes, or hide one when escaped."""
    if isinstance(value, list):
        return 1 + sum(_arrays(item) for item in value)
    if isinstance(value, dict):
        return sum(_arrays(key) + _arrays(item) for key, item in value.items())
    if isinstance(value, str) and "[" in value:
        raise _Fallback
    return 0
