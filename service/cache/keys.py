"""The cache key: a BLAKE2b hash of everything that decides a prediction.

The bytes hashed are fixed (``ferry-key-v1``): a change here would orphan every entry in a shared Redis,
so ``tests/unit/test_cache.py`` pins one key's digest.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import orjson

from service.cache.codec import little_endian

_U64: Final = struct.Struct("<Q")
_KEY_KINDS: Final = frozenset("biufcSUMm")


def cache_key(
    model: str, version: str, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None
) -> bytes:
    """32-byte BLAKE2b of the canonical request; every field is length-prefixed.

    Model name, resolved version (so a new version never sees an old version's entries), every input's
    name, dtype, shape and little-endian bytes, in name order, and the params as sorted-key JSON.
    An object array (a table's strings or bytes) adds each item tagged and length-prefixed. Raises
    ``TypeError`` for inputs whose bytes do not identify their value (void, objects other than ``str``,
    ``bytes`` and ``None``).
    """
    h = hashlib.blake2b(digest_size=32, person=b"ferry-key-v1")
    for text in (model, version):
        data = text.encode()
        h.update(_U64.pack(len(data)))
        h.update(data)
    h.update(_U64.pack(len(inputs)))
    for name in sorted(inputs):
        array = inputs[name]
        kind = array.dtype.kind
        if kind not in _KEY_KINDS and kind != "O":
            raise TypeError(f"input {name!r} of dtype {array.dtype} cannot be cached")
        if kind != "O":
            array = little_endian(array)
        name_bytes, dtype_bytes = name.encode(), array.dtype.str.encode()
        h.update(
            struct.pack(f"<QQQ{array.ndim}Q", len(name_bytes), len(dtype_bytes), array.ndim, *array.shape)
        )
        h.update(name_bytes)
        h.update(dtype_bytes)
        if kind == "O":
            _objects(h, name, array)
        else:  # datetimes as their 64-bit counts (the dtype above names the unit)
            h.update((array.view(np.int64) if kind in "Mm" else array).data)
    data = orjson.dumps(params, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY) if params else b""
    h.update(_U64.pack(len(data)))
    h.update(data)
    return h.digest()


def _objects(h: Any, name: str, array: np.ndarray) -> None:
    """Each item of an object array: a tag (``s`` text, ``b`` bytes, ``n`` null) and its length-prefixed
    bytes; anything else cannot be keyed."""
    for item in array.ravel().tolist():
        if type(item) is str:
            data, tag = item.encode("utf-8", "surrogatepass"), b"s"
        elif type(item) is bytes:
            data, tag = item, b"b"
        elif item is None:
            data, tag = b"", b"n"
        else:
            raise TypeError(f"input {name!r} holds a {type(item).__name__}, which cannot be cached")
        h.update(tag)
        h.update(_U64.pack(len(data)))
        h.update(data)
