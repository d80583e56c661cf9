"""The response tier: bounded in bytes, TTL, only cacheable 200s, replays say X-Cache: hit."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from dataclasses import replace
from typing import Any

import numpy as np
from fastapi.responses import Response

from conftest import FakeClock
from service.api.replay import ResponseCache
from service.pipeline import Answer


def answered(ttl: float | None = 10.0) -> Answer:
    return Answer("m", "3", "pytorch", {}, "miss", 1, "ferry", replay_ttl_s=ttl, metrics=None)  # type: ignore[arg-type]


def ok(body: bytes = b'{"outputs": [1]}') -> Response:
    return Response(body, media_type="application/json", headers={"X-Cache": "miss", "X-Model-Version": "3"})


SCOPE: dict[str, Any] = {
    "method": "POST",
    "path": "/predict",
    "headers": [(b"content-type", b"application/json")],
}


def test_replay_keeps_body_and_headers_and_says_hit() -> None:
    cache = ResponseCache(10_000)
    key = cache.key(SCOPE, b"{}", generation=1)
    cache.put(key, ok(), answered())
    entry = cache.get(key)
    assert entry is not None
    response = entry.response()
    assert response.body == b'{"outputs": [1]}'
    assert (b"x-cache", b"hit") in response.raw_headers and (b"x-model-version", b"3") in response.raw_headers


def test_keys_change_with_generation_path_body_and_content_type() -> None:
    base = ResponseCache.key(SCOPE, b"{}", 1)
    assert base != ResponseCache.key(SCOPE, b"{}", 2)
    assert base != ResponseCache.key(SCOPE | {"path": "/invocations"}, b"{}", 1)
    assert base != ResponseCache.key(SCOPE, b"{ }", 1)
    assert base != ResponseCache.key(SCOPE | {"headers": [(b"content-type", b"text/csv")]}, b"{}", 1)
    headers = [*SCOPE["headers"], (b"user-agent", b"x")]
    assert base == ResponseCache.key(SCOPE | {"headers": headers}, b"{}", 1)  # not a keyed header


def test_ttl_expires_and_uncacheable_answers_are_not_kept() -> None:
    clock = FakeClock()
    cache = ResponseCache(10_000, clock=clock)
    cache.put(b"a", ok(), answered(ttl=5))
    cache.put(b"b", ok(), answered(ttl=None))  # caching off for the model, or Cache-Control
    cache.put(b"c", Response(b"err", status_code=503), answered())
    assert cache.get(b"a") is not None and cache.get(b"b") is None and cache.get(b"c") is None
    clock.now += 6
    assert cache.get(b"a") is None and cache.bytes == 0


def test_bounded_in_bytes_least_recently_used_goes_first() -> None:
    one = ResponseCache(100_000)
    one.put(b"a", ok(b"x" * 150), answered())
    size = one.bytes  # what one such answer holds, as the cache counts it
    assert size > 150 + sum(len(k) + len(v) for k, v in ok(b"x" * 150).raw_headers)
    cache = ResponseCache(3 * size)
    for key in (b"a", b"b", b"c"):
        cache.put(key, ok(b"x" * 150), answered())
    assert cache.bytes == 3 * size
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", ok(b"x" * 150), answered())
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.get(b"d") is not None
    assert cache.bytes <= 3 * size
    cache.put(b"huge", ok(b"x" * 4 * size), answered())
    assert cache.get(b"huge") is None


def test_a_stored_answer_keeps_its_metrics_not_its_arrays() -> None:
    batch = np.zeros((1000, 100))  # the batch the model computed; the answer's outputs are a view into it
    cache, watch = ResponseCache(100_000), weakref.ref(batch)
    cache.put(b"a", ok(), replace(answered(), outputs={"y": batch[3:4]}))
    del batch
    gc.collect()
    assert watch() is None
    entry = cache.get(b"a")
    assert entry is not None and (entry.answer.rows, entry.answer.protocol) == (1, "ferry")


def test_bound_holds_in_real_memory() -> None:
    """Filled three times over with tracemalloc on, what the tier keeps stays near its bound."""
    bound, cache = 1_000_000, None
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = ResponseCache(bound)
        for i in range(4 * bound // 1_000):  # about 1,200 bytes an answer
            cache.put(b"%032d" % i, ok(b'{"outputs": [%d]}' % i), answered())
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert bound - cache.bytes < 2_000  # full
    assert 0.75 * bound <= held <= 1.2 * bound


def test_a_body_cannot_pose_as_a_header_in_the_key() -> None:
    """Fields are length-prefixed: a body that spells out the binary-tensor header is not the request
    that sends that header."""
    base = {"method": "POST", "path": "/v2/models/m/infer"}
    with_header = {**base, "headers": [(b"content-type", b"a"), (b"inference-header-content-length", b"5")]}
    without = {**base, "headers": [(b"content-type", b"a")]}
    body = b'{"x":1}'
    forged = b"inference-header-content-length\x005\x00" + body
    assert ResponseCache.key(with_header, body, 1) != ResponseCache.key(without, forged, 1)
    assert ResponseCache.key(with_header, body, 1) == ResponseCache.key(with_header, body, 1)
