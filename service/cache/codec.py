"""The cache value: a model's outputs as a small header plus raw array bytes, never pickle.

Format ``FRY1`` (shared with every replica through Redis, so fixed; ``tests/unit/test_cache.py`` pins
one value): magic, output count, then per output its name, dtype and shape; then each array's bytes,
8-byte aligned. Anything else read back is ``CorruptCacheValue``.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Mapping
from typing import Final

import numpy as np

Outputs = dict[str, np.ndarray]
"""A model's outputs by name, as the cache hands them back (read-only arrays)."""

_VALUE_HEAD: Final = struct.Struct("<4sI")  # magic, output count
_OUTPUT_HEAD: Final = struct.Struct("<HBB")  # name length, dtype length, ndim
_MAGIC: Final = b"FRY1"
_MAX_NDIM: Final = 32
_VALUE_DTYPES: Final = {
    dt.str: dt
    for dt in map(
        np.dtype, ("?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16")
    )
}
"""Dtypes a cached value may hold, by canonical little-endian ``dtype.str`` (numeric and bool only)."""


class CorruptCacheValue(ValueError):
    """A cached value that is not one ``encode_outputs`` wrote (foreign, truncated or tampered)."""


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array as little-endian C-contiguous memory (no copy when it already is)."""
    if array.dtype.str[0] == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> bytes:
    """``FRY1``, count, then per output name, dtype and shape; then each array's bytes, 8-byte aligned.

    Raises ``TypeError`` for outputs the format cannot hold (strings, objects, more than 32 axes).
    """
    head = [_VALUE_HEAD.pack(_MAGIC, len(outputs))]
    arrays = []
    for name, array in outputs.items():
        array = little_endian(np.asarray(array))
        if array.dtype.str not in _VALUE_DTYPES or array.ndim > _MAX_NDIM:
            raise TypeError(f"output {name!r} of dtype {array.dtype} cannot be cached")
        name_bytes, dtype_bytes = name.encode(), array.dtype.str.encode()
        head.append(_OUTPUT_HEAD.pack(len(name_bytes), len(dtype_bytes), array.ndim))
        head += (name_bytes, dtype_bytes, struct.pack(f"<{array.ndim}Q", *array.shape))
        arrays.append(array)
    parts, size = head, sum(map(len, head))
    for array in arrays:
        parts.append(bytes(-size % 8))
        parts.append(array.tobytes())
        size += -size % 8 + array.nbytes
    return b"".join(parts)


def decode_outputs(data: bytes) -> Outputs:
    """What ``encode_outputs`` wrote, as read-only views on ``data``; ``CorruptCacheValue`` otherwise.

    Each array is one object whose base is ``data`` itself (no intermediate array), so a decoded value
    holds ``data``, the dict, the names and one array object per output: ``held_bytes`` counts them.
    """
    try:
        magic, count = _VALUE_HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise CorruptCacheValue("not a Ferry cache value")
        pos, specs = _VALUE_HEAD.size, []
        for _ in range(count):
            name_len, dtype_len, ndim = _OUTPUT_HEAD.unpack_from(data, pos)
            pos += _OUTPUT_HEAD.size
            end = pos + name_len + dtype_len
            if end > len(data) or ndim > _MAX_NDIM:
                raise CorruptCacheValue("bad output header")
            name = data[pos : pos + name_len].decode()
            dtype = _VALUE_DTYPES.get(data[pos + name_len : end].decode("ascii"))
            shape = struct.unpack_from(f"<{ndim}Q", data, end)
            pos = end + 8 * ndim
            if dtype is None:
                raise CorruptCacheValue("dtype not allowed")
            specs.append((name, dtype, shape))
        outputs = {}
        for name, dtype, shape in specs:
            pos += -pos % 8
            nbytes = math.prod(shape) * dtype.itemsize
            if pos + nbytes > len(data):
                raise CorruptCacheValue("truncated value")
            outputs[name] = np.ndarray(shape, dtype, data, pos)  # read-only: ``data`` is immutable
            pos += nbytes
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise CorruptCacheValue(f"unreadable cache value: {exc}") from None
    if pos != len(data) or len(outputs) != count:
        raise CorruptCacheValue("trailing bytes or repeated names")
    return outputs


def held_bytes(outputs: Outputs) -> int:
    """Memory a decoded value keeps alive: the dict, names, array objects and the buffers under them."""
    size, buffers = sys.getsizeof(outputs), {}
    for name, array in outputs.items():
        size += sys.getsizeof(name) + sys.getsizeof(array)  # an array that owns its data counts it too
        if array.base is not None:
            buffers[id(array.base)] = sys.getsizeof(array.base)
    return size + sum(buffers.values())
