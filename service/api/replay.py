"""The response tier of the prediction cache: whole rendered answers, keyed on the raw request.

A repeated request is answered before its body is parsed: the key is a BLAKE2b hash of the path, the
headers that change the answer's form (content type, the binary tensor header), the body bytes and the
service's ``generation``, which changes whenever a model version is swapped in, added or removed, so no
replayed answer outlives the version that computed it. Only answers the array cache would also keep are
stored (the model's caching on, no ``Cache-Control`` on the request), for the model's TTL. Memory only,
bounded in bytes (``FERRY_CACHE__RESPONSE_BYTES``); the array tiers (memory, Redis) stay the shared,
canonical cache: this tier only saves the parsing, validation, hashing and rendering of a repeat.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fastapi.responses import Response
from starlette.types import Scope

from service.inference import Answered

_VARY = (b"content-type", b"inference-header-content-length")


@dataclass(frozen=True, slots=True)
class Replay:
    """A stored answer."""

    body: bytes
    headers: list[tuple[bytes, bytes]]
    media_type: str | None
    answered: Answered
    expires: float

    def response(self) -> Response:
        response = Response(self.body, media_type=self.media_type)
        response.raw_headers = list(self.headers)
        return response


class ResponseCache:
    """LRU of ``Replay`` entries bounded in bytes (bodies and headers), each with its TTL."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_bytes
        self._clock = clock
        self._entries: OrderedDict[bytes, Replay] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def key(scope: Scope, body: bytes, generation: int) -> bytes:
        h = hashlib.blake2b(digest_size=32, person=b"ferry-replay-v1")
        h.update(f"{generation}\0{scope['method']}\0{scope['path']}\0".encode())
        for name, value in scope["headers"]:
            if name in _VARY:
                h.update(name + b"\0" + value + b"\0")
        h.update(body)
        return h.digest()

    def get(self, key: bytes) -> Replay | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, response: Response, answered: Answered) -> None:
        if answered.ttl_s is None or response.status_code != 200:
            return
        headers = [(k, b"hit" if k == b"x-cache" else v) for k, v in response.raw_headers]
        entry = Replay(
            bytes(response.body), headers, response.media_type, answered, self._clock() + answered.ttl_s
        )
        size = _size(entry)
        if size > self._max:
            return
        self._drop(key)
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self._max:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= _size(entry)


def _size(entry: Replay) -> int:
    return 32 + len(entry.body) + sum(len(k) + len(v) for k, v in entry.headers)
