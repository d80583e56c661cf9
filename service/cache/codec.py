"""The cache value: a model's outputs as a small header plus raw array bytes, never pickle.

Format ``FRY1`` (shared with every replica through Redis, so fixed; ``tests/unit/test_cache.py`` pins
one value): magic, output count, then per output its name, dtype and shape; then each array's bytes,
8-byte aligned. An array of strings (an object array whose items are all ``str`` or ``None``: a
classifier's labels) has the dtype ``str``; its bytes are one little-endian int64 length per item (-1:
``None``) followed by the items' UTF-8 bytes, so reading it back never parses anything but lengths and
UTF-8. Anything else read back is ``CorruptCacheValue``.

``ValueSealer`` wraps a value for Redis with a MAC (``FRM1``, HMAC-SHA256 under a secret, bound to the
Redis key): a value without a tag that verifies is ``ForgedCacheValue``.
"""

from __future__ import annotations

import hashlib
import hmac
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
_STR: Final = "str"
"""The dtype field of an array of strings (never a numpy ``dtype.str``, which starts with ``<|>``)."""
_LENGTHS: Final = np.dtype("<i8")


class CorruptCacheValue(ValueError):
    """A cached value that is not one ``encode_outputs`` wrote (foreign, truncated or tampered)."""


class ForgedCacheValue(CorruptCacheValue):
    """A Redis value whose MAC does not verify: planted, written under another secret, or without one."""


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array as little-endian C-contiguous memory (no copy when it already is)."""
    if array.dtype.str[0] == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> bytes:
    """``FRY1``, count, then per output name, dtype and shape; then each array's bytes, 8-byte aligned.

    Raises ``TypeError`` for outputs the format cannot hold (objects other than strings and ``None``,
    fixed-width string arrays, more than 32 axes).
    """
    head = [_VALUE_HEAD.pack(_MAGIC, len(outputs))]
    bodies: list[list[bytes]] = []
    for name, array in outputs.items():
        array = np.asarray(array)
        if array.ndim > _MAX_NDIM:
            raise TypeError(f"output {name!r} has {array.ndim} axes; at most {_MAX_NDIM} can be cached")
        if array.dtype == object:
            dtype_text, body = _STR, _string_bytes(name, array)
        else:
            array = little_endian(array)
            if array.dtype.str not in _VALUE_DTYPES:
                raise TypeError(f"output {name!r} of dtype {array.dtype} cannot be cached")
            dtype_text, body = array.dtype.str, [array.tobytes()]
        name_bytes, dtype_bytes = name.encode(), dtype_text.encode()
        head.append(_OUTPUT_HEAD.pack(len(name_bytes), len(dtype_bytes), array.ndim))
        head += (name_bytes, dtype_bytes, struct.pack(f"<{array.ndim}Q", *array.shape))
        bodies.append(body)
    parts, size = head, sum(map(len, head))
    for body in bodies:
        parts.append(bytes(-size % 8))
        parts += body
        size += -size % 8 + sum(map(len, body))
    return b"".join(parts)


def _string_bytes(name: str, array: np.ndarray) -> list[bytes]:
    """An object array of ``str``/``None`` as its item lengths (-1: ``None``) then its UTF-8 bytes."""
    items = array.ravel().tolist()  # C order, the order decoding fills
    encoded = []
    lengths = np.empty(len(items), _LENGTHS)
    for i, item in enumerate(items):
        if item is None:
            lengths[i] = -1
            continue
        if not isinstance(item, str):
            raise TypeError(f"output {name!r} holds a {type(item).__name__}; only strings can be cached")
        try:
            data = item.encode()
        except UnicodeEncodeError:  # a lone surrogate: not text that survives a round trip
            raise TypeError(f"output {name!r} holds a string that is not valid Unicode") from None
        lengths[i] = len(data)
        encoded.append(data)
    return [lengths.tobytes(), *encoded]


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
            dtype_text = data[pos + name_len : end].decode("ascii")
            dtype = None if dtype_text == _STR else _VALUE_DTYPES.get(dtype_text)
            shape = struct.unpack_from(f"<{ndim}Q", data, end)
            pos = end + 8 * ndim
            if dtype is None and dtype_text != _STR:
                raise CorruptCacheValue("dtype not allowed")
            specs.append((name, dtype, shape))
        outputs = {}
        for name, dtype, shape in specs:
            pos += -pos % 8
            if dtype is None:
                outputs[name], pos = _strings(data, pos, shape)
                continue
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


def _strings(data: bytes, pos: int, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """The array of strings at ``pos`` (read-only, owning its items) and the position after it."""
    count = math.prod(shape)
    if pos + count * _LENGTHS.itemsize > len(data):
        raise CorruptCacheValue("truncated value")
    lengths = np.frombuffer(data, _LENGTHS, count, pos)
    pos += count * _LENGTHS.itemsize
    if count and (int(lengths.min()) < -1 or int(lengths.max()) > len(data)):
        raise CorruptCacheValue("bad string length")
    if pos + int(lengths.clip(0).sum()) > len(data):
        raise CorruptCacheValue("truncated value")
    items: list[str | None] = []
    for length in lengths.tolist():
        if length < 0:
            items.append(None)
        else:
            items.append(data[pos : pos + length].decode())  # UnicodeDecodeError: corrupt
            pos += length
    array = np.empty(shape, dtype=object)
    array.reshape(-1)[:] = items  # a view of ``array``'s own buffer: no nesting, whatever the items
    array.flags.writeable = False
    return array, pos


def held_bytes(outputs: Outputs) -> int:
    """Memory a decoded value keeps alive: the dict, names, array objects and the buffers under them,
    and the strings of an array of strings."""
    size, buffers = sys.getsizeof(outputs), {}
    for name, array in outputs.items():
        size += sys.getsizeof(name) + sys.getsizeof(array)  # an array that owns its data counts it too
        if array.base is not None:
            buffers[id(array.base)] = sys.getsizeof(array.base)
        if array.dtype == object:
            size += sum(sys.getsizeof(item) for item in array.ravel().tolist() if item is not None)
    return size + sum(buffers.values())


_SEALED: Final = b"FRM1"
_TAG_BYTES: Final = 32
_U64: Final = struct.Struct("<Q")


class ValueSealer:
    """A MAC on every value written to Redis, checked on every value read: HMAC-SHA256 under a secret
    shared by the replicas, over the Redis key and the value, so a value is only ever accepted under
    the key it was written for (a valid value moved to another key is refused too).

    Sealed: ``FRM1``, the 32-byte tag, then the ``FRY1`` value. Replay of an older value under its own key
    is not detected (it is the answer the same model gave to the same inputs).
    """

    MIN_SECRET_BYTES: Final = 16

    def __init__(self, secret: bytes) -> None:
        if len(secret) < self.MIN_SECRET_BYTES:
            raise ValueError(f"the secret must be at least {self.MIN_SECRET_BYTES} bytes")
        self._keyed = hmac.new(secret, b"ferry-redis-value-v1", hashlib.sha256)  # key schedule once

    def seal(self, key: bytes, value: bytes) -> bytes:
        return b"".join((_SEALED, self._tag(key, value), value))

    def open(self, key: bytes, sealed: bytes) -> bytes:
        """The value sealed under ``key``; ``ForgedCacheValue`` when it has no tag or the tag is wrong."""
        start = len(_SEALED) + _TAG_BYTES
        if len(sealed) < start or not sealed.startswith(_SEALED):
            raise ForgedCacheValue("the value carries no MAC")
        tag = self._tag(key, memoryview(sealed)[start:])
        if not hmac.compare_digest(tag, sealed[len(_SEALED) : start]):
            raise ForgedCacheValue("the value's MAC does not verify")
        return sealed[start:]

    def _tag(self, key: bytes, value: bytes | memoryview) -> bytes:
        mac = self._keyed.copy()
        mac.update(_U64.pack(len(key)))
        mac.update(key)
        mac.update(value)
        return mac.digest()
