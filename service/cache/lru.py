"""``ByteLRU``: the one in-process LRU of the cache, bounded in bytes, with a TTL per entry.

Both memory tiers use it: the array tier (decoded outputs, ``tiered.py``) and the response tier
(rendered answers, ``service/api/replay.py``). Each says what one of its values costs; the LRU adds
what an entry costs it (``ENTRY_BYTES``) and the key's bytes. Sync, and not thread-safe: everything runs
on the event loop's thread, and a hit never awaits.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Generic, TypeVar

V = TypeVar("V")
Clock = Callable[[], float]
"""Seconds, monotonic; injectable so tests move time by hand."""

ENTRY_BYTES: Final = 272
"""Memory one entry costs beyond its key's and its value's bytes: the key's ``bytes`` header, its
``OrderedDict`` slot (hash table entry, index, linked-list node), the ``(value, expires, size)`` tuple
and the float and int in it. Measured with tracemalloc over 1,000 to 700,000 ``put`` of fresh 32-byte
keys and one shared value (Python 3.11, 64-bit): 214 to 269 bytes an entry beyond the key's 32, the
figure rising as the dict's table fills and doubles; 272 is the worst case, rounded up."""


class ByteLRU(Generic[V]):
    """Least recently used entries go first once ``bytes`` would pass ``max_bytes``; an entry past its
    TTL is dropped when next looked at. ``size(value)``: the bytes a value holds (the caller's measure)."""

    def __init__(self, max_bytes: int, size: Callable[[V], int], *, clock: Clock = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._size = size
        self._clock = clock
        self._data: OrderedDict[bytes, tuple[V, float, int]] = OrderedDict()

    @property
    def entries(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            self.drop(key)
            return None
        self._data.move_to_end(key)
        return item[0]

    def put(self, key: bytes, value: V, ttl_s: float) -> None:
        """Store (or replace) an entry for ``ttl_s`` seconds; one larger than the whole bound, or with no
        time to live, is not stored (and the entry it replaces is gone)."""
        self.drop(key)
        size = ENTRY_BYTES + len(key) + self._size(value)
        if size > self.max_bytes or ttl_s <= 0:
            return
        self._data[key] = (value, self._clock() + ttl_s, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, old_size) = self._data.popitem(last=False)
            self.bytes -= old_size

    def drop(self, key: bytes) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self.bytes -= item[2]

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0
