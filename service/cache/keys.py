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
_KEY_KINDS: Final = frozenset("biufcSU")


def cache_key(
    model: str, version: str, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None
) -> bytes:
    """32-byte BLAKE2b of the canonical request; every field is length-prefixed.

    Model name, resolved version (so a new version never sees an old version's entries), every input's
    name, dtype, shape and little-endian bytes, in name order, and the params as sorted-key JSON.
    Raises ``TypeError`` for inputs whose bytes do not identify their value (object, void, datetime).
    """
    h = hashlib.blake2b(digest_size=32, person=b"ferry-key-v1")
    for text in (model, version):
        data = text.encode()
        h.update(_U64.pack(len(data)))
        h.update(data)
    h.update(_U64.pack(len(inputs)))
    for name in sorted(inputs):
        array = inputs[name]
        if array.dtype.kind not in _KEY_KINDS:
            raise TypeError(f"input {name!r} of dtype {array.dtype} cannot be cached")
        array = little_endian(array)
        name_bytes, dtype_bytes = name.encode(), array.dtype.str.encode()
        h.update(
            struct.pack(f"<QQQ{array.ndim}Q", len(name_bytes), len(dtype_bytes), array.ndim, *array.shape)
        )
        h.update(name_bytes)
        h.update(dtype_bytes)
        h.update(array.data)
    data = orjson.dumps(params, option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY) if params else b""
    h.update(_U64.pack(len(data)))
    h.update(data)
    return h.digest()
