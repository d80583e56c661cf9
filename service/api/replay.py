"""The response tier of the prediction cache: whole rendered answers, keyed on the raw request.

A repeated request is answered before its body is parsed: the key is a BLAKE2b hash of the path, the
headers that change the answer's form (content type, the binary tensor header), the body bytes and the
service's ``generation``, which changes whenever a model version is swapped in, added or removed, so no
replayed answer outlives the version that computed it. Only answers the array cache would also keep are
stored (the model's caching on, no ``Cache-Control`` on the request), for the model's TTL. Memory only,
bounded in bytes (``FERRY_CACHE__RESPONSE_BYTES``); the array tiers (memory, Redis) stay the shared,
canonical cache: this tier only saves the parsing, validation, hashing and rendering of a repeat.
Entries live in the cache's one LRU (``service/cache/lru.py``), each counted by the memory it holds.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from fastapi.responses import Response
from starlette.types import Scope

from service.cache import ByteLRU
from service.pipeline import Answer

_VARY = (b"content-type", b"inference-header-content-length")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored answer."""

    body: bytes
    headers: list[tuple[bytes, bytes]]
    media_type: str | None
    answer: Answer
    """The answer replayed, for its metrics, protocol and rows; without its outputs (``put``)."""

    def response(self) -> Response:
        response = Response(self.body, media_type=self.media_type)
        response.raw_headers = list(self.headers)
        return response


class ResponseCache:
    """``Replay`` entries by request key, bounded in bytes, each kept for its answer's TTL."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._lru: ByteLRU[Replay] = ByteLRU(max_bytes, _held_bytes, clock=clock)

    @staticmethod
    def key(scope: Scope, body: bytes, generation: int) -> bytes:
        """Every field length-prefixed, so no body can be read as headers, nor a header as another."""
        h = hashlib.blake2b(digest_size=32, person=b"ferry-replay-v2")
        fields = [str(generation).encode(), scope["method"].encode(), scope["path"].encode()]
        fields += [part for name, value in scope["headers"] if name in _VARY for part in (name, value)]
        for field in fields:
            h.update(_U64.pack(len(field)))
            h.update(field)
        h.update(_U64.pack(len(body)))
        h.update(body)
        return h.digest()

    def get(self, key: bytes) -> Replay | None:
        return self._lru.get(key)

    def put(self, key: bytes, response: Response, answer: Answer) -> None:
        if answer.replay_ttl_s is None or response.status_code != 200:
            return
        headers = [(k, b"hit" if k == b"x-cache" else v) for k, v in response.raw_headers]
        # The body already renders the outputs: keeping the arrays (on a miss, views into the whole batch
        # the model computed) or the codec's extra would hold memory that no entry's size counts.
        kept = replace(answer, outputs={}, extra=None)
        entry = Replay(bytes(response.body), headers, response.media_type, kept)
        self._lru.put(key, entry, answer.replay_ttl_s)

    @property
    def bytes(self) -> int:  # last in the class: above, ``bytes`` is still the builtin
        return self._lru.bytes


def _held_bytes(entry: Replay) -> int:
    """Memory a stored answer holds: the entry, its body, its header list, pairs and bytes, and the
    answer record's own object (the model's metrics it names are shared)."""
    headers = sum(
        sys.getsizeof(pair) + sys.getsizeof(pair[0]) + sys.getsizeof(pair[1]) for pair in entry.headers
    )
    parts = (entry, entry.body, entry.headers, entry.answer)
    return sum(map(sys.getsizeof, parts)) + headers
