"""The cache classes against a real ``redis-server`` that each test starts on a free port.

Kills, pauses and restarts the server under the cache to check that it fails open and recovers by
itself. The breaker runs on a fake clock, so no test waits for ``breaker_reset_s`` to pass.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import FakeClock, RedisServer, free_port, state_of
from service.cache import (
    BreakerState,
    Outputs,
    RedisCache,
    TieredCache,
    build_cache,
    cache_key,
    decode_outputs,
    encode_outputs,
)
from service.config import CacheSettings, Settings
from service.metrics import Metrics

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not on PATH"),
]

TIMEOUT_MS = 50.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def settings(url: str, **cache: object) -> Settings:
    cache.setdefault("redis_timeout_ms", TIMEOUT_MS)
    return Settings(redis_url=url, cache=CacheSettings(**cache))  # type: ignore[arg-type]


def redis_tier(url: str, metrics: Metrics, clock: FakeClock | None = None, **cache: object) -> RedisCache:
    cache.setdefault("redis_timeout_ms", TIMEOUT_MS)
    extra = {"clock": clock} if clock is not None else {}
    return RedisCache.from_url(url, CacheSettings(**cache), metrics, **extra)  # type: ignore[arg-type]


def errors(metrics: Metrics, operation: str) -> float:
    labels = {"tier": "redis", "operation": operation}
    return metrics.registry.get_sample_value("ferry_cache_errors_total", labels) or 0.0


KEY = cache_key("fraud", "3", {"x": np.array([[1.0, 2.0]], dtype=np.float32)}, None)
OUTPUTS = {"y": np.array([[5.0]], dtype=np.float32)}
VALUE = encode_outputs(OUTPUTS)


def got(result: tuple[Outputs | None, str]) -> tuple[bytes | None, str]:
    """A tiered cache's answer with its outputs encoded, to compare with ``VALUE``."""
    found, tier = result
    return (None if found is None else encode_outputs(found)), tier


@pytest.mark.asyncio
async def test_miss_then_hit_with_plain_bytes_and_ttl(server: RedisServer) -> None:
    metrics = Metrics(process=False)
    cache = build_cache(settings(server.url, memory_bytes=0, key_prefix="t:"), metrics)
    assert cache.memory is None
    assert cache.redis is not None
    try:
        assert await cache.get("fraud", KEY) == (None, "")
        await cache.set("fraud", KEY, OUTPUTS, 30)
        await cache.flush()
        assert got(await cache.get("fraud", KEY)) == (VALUE, "redis")
    finally:
        await cache.close()
    raw = server.client()
    redis_key = b"t:" + KEY.hex().encode()
    assert raw.keys() == [redis_key]
    stored = raw.get(redis_key)
    assert stored == VALUE
    assert stored.startswith(b"FRY1")
    assert b"numpy" not in stored
    assert not stored.startswith(b"\x80")
    np.testing.assert_array_equal(decode_outputs(stored)["y"], [[5.0]])
    assert 29_000 < raw.pttl(redis_key) <= 30_000
    lookups = metrics.registry.get_sample_value(
        "ferry_cache_lookups_total", {"model": "fraud", "tier": "redis", "result": "hit"}
    )
    assert lookups == 1


@pytest.mark.asyncio
async def test_garbage_value_is_a_miss_and_gets_overwritten(server: RedisServer) -> None:
    metrics = Metrics(process=False)
    cache = build_cache(settings(server.url), metrics)
    assert cache.redis is not None
    raw, redis_key = server.client(), cache.redis.redis_key(KEY)
    try:
        for garbage in (b"\x80\x04\x95garbage.", b"FRY1\x01\x00", b"not a value"):
            raw.set(redis_key, garbage)
            assert await cache.get("fraud", KEY) == (None, "")
        raw.delete(redis_key)
        raw.rpush(redis_key, b"a list")  # WRONGTYPE from Redis: a miss, not a breaker failure
        assert await cache.get("fraud", KEY) == (None, "")
        assert state_of(cache.redis.breaker) == BreakerState.CLOSED
        await cache.set("fraud", KEY, OUTPUTS, 30)
        await cache.flush()
        assert raw.get(redis_key) == VALUE
        assert cache.memory is not None
        cache.memory.clear()
        assert got(await cache.get("fraud", KEY)) == (VALUE, "redis")
        assert got(await cache.get("fraud", KEY)) == (VALUE, "memory")
    finally:
        await cache.close()
    assert errors(metrics, "get") == 4


@pytest.mark.asyncio
async def test_unix_socket_url(server: RedisServer) -> None:
    cache = redis_tier(f"unix://{server.socket}?db=2", Metrics(process=False))
    try:
        await cache.set(KEY, VALUE, 30)
        assert await cache.get(KEY) == VALUE
    finally:
        await cache.close()
    assert server.client(db=2).get(cache.redis_key(KEY)) == VALUE


@pytest.mark.asyncio
async def test_password_and_db_in_url(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path, "--requirepass", "s3cret-pw")
    server.start()
    try:
        metrics = Metrics(process=False)
        good = redis_tier(f"redis://:s3cret-pw@127.0.0.1:{server.port}/3", metrics)
        bad = redis_tier(f"redis://:wrong-pw@127.0.0.1:{server.port}/3", metrics, breaker_failures=1)
        try:
            await good.set(KEY, VALUE, 30)
            assert await good.get(KEY) == VALUE
            assert await bad.get(KEY) is None  # fails open
            assert state_of(bad.breaker) == BreakerState.OPEN
        finally:
            await good.close()
            await bad.close()
        assert server.client(password="s3cret-pw", db=3).get(good.redis_key(KEY)) == VALUE
        assert server.client(password="s3cret-pw", db=0).dbsize() == 0
    finally:
        server.kill()
    assert "s3cret-pw" not in caplog.text
    assert "wrong-pw" not in caplog.text


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH (needed to make a test certificate)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1")
    files = ("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost")
    san = ("-addext", "subjectAltName=IP:127.0.0.1")
    subprocess.run(["openssl", "req", "-x509", *curve, *files, *san], check=True, capture_output=True)
    return cert, key


@pytest.mark.asyncio
async def test_tls_url(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    tls_port = free_port()
    server = RedisServer(tmp_path, "--tls-port", str(tls_port), "--tls-cert-file", str(cert))
    server.extra += ("--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no")
    try:
        server.start()
    except RuntimeError:
        pytest.skip("this redis-server was built without TLS")
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        cache = redis_tier(url, Metrics(process=False), redis_timeout_ms=2000)  # a handshake on 2 busy cores
        try:
            await cache.set(KEY, VALUE, 30)
            assert await cache.get(KEY) == VALUE
        finally:
            await cache.close()
        assert server.client().get(cache.redis_key(KEY)) == VALUE  # the same data over plain TCP
    finally:
        server.kill()


async def bounded(coro: object) -> tuple[object, float]:
    start = time.perf_counter()
    async with asyncio.timeout(10):  # a hang fails the test instead of blocking it
        result = await coro  # type: ignore[misc]
    return result, time.perf_counter() - start


@pytest.mark.asyncio
async def test_redis_killed_under_concurrent_load_fails_open(server: RedisServer) -> None:
    metrics = Metrics(process=False)
    cache = redis_tier(server.url, metrics, breaker_failures=5)
    keys = [cache_key("m", "1", {"x": np.array([i], dtype=np.int64)}, None) for i in range(50)]
    for key in keys:
        await cache.set(key, VALUE, 60)
    calls_done = 0
    half_way = asyncio.Event()

    async def worker(i: int) -> list[float]:
        nonlocal calls_done
        durations = []
        for j in range(20):
            key = keys[(i + j) % len(keys)]
            if j % 2:
                result, took = await bounded(cache.set(key, VALUE, 60))
                assert result is None
            else:
                result, took = await bounded(cache.get(key))
                assert result in (VALUE, None)  # never a wrong value
            durations.append(took)
            calls_done += 1
            if calls_done == 1000:
                half_way.set()
            await asyncio.sleep(0)
        return durations

    tasks = [asyncio.create_task(worker(i)) for i in range(200)]
    await half_way.wait()
    server.kill()
    durations = [d for ds in await asyncio.gather(*tasks) for d in ds]  # raises if any call raised
    try:
        assert len(durations) == 4000
        assert max(durations) < 1.0
        assert state_of(cache.breaker) == BreakerState.OPEN
        assert errors(metrics, "get") + errors(metrics, "set") >= 5
        assert await cache.get(keys[0]) is None
    finally:
        await cache.close()


@pytest.mark.asyncio
async def test_paused_redis_times_out_each_call(server: RedisServer) -> None:
    metrics = Metrics(process=False)
    cache = redis_tier(server.url, metrics, breaker_failures=1000)
    await cache.set(KEY, VALUE, 60)
    server.pause()  # accepts connections, never answers: the slow-Redis case
    try:
        results = await asyncio.gather(*(bounded(cache.get(KEY)) for _ in range(50)))
        assert all(result is None and took < 1.0 for result, took in results)
        assert errors(metrics, "get") == 50
    finally:
        server.resume()
    try:
        assert await cache.get(KEY) == VALUE  # the timed-out connections were dropped, not reused
    finally:
        await cache.close()


@pytest.mark.asyncio
async def test_breaker_cycle_and_recovery_after_restart(server: RedisServer) -> None:
    metrics, clock = Metrics(process=False), FakeClock()
    cache = redis_tier(server.url, metrics, clock, breaker_failures=3, breaker_reset_s=5)
    tiers = TieredCache(None, cache, metrics)

    def state() -> float | None:
        return metrics.registry.get_sample_value("ferry_cache_breaker_state")

    try:
        await cache.set(KEY, VALUE, 60)
        assert await cache.get(KEY) == VALUE
        server.kill()
        for _ in range(10):
            result, took = await bounded(cache.get(KEY))
            assert result is None
            assert took < 1.0
        assert errors(metrics, "get") == 3  # the breaker opened after 3 and stopped calling Redis
        assert state_of(cache.breaker) == BreakerState.OPEN
        assert state() == 2
        await tiers.set("m", KEY, OUTPUTS, 60)
        assert tiers.pending_writes == 0  # no background write while open

        clock.now += 5  # one probe; Redis is still down: open again
        assert await cache.get(KEY) is None
        assert await cache.get(KEY) is None
        assert errors(metrics, "get") == 4
        assert state_of(cache.breaker) == BreakerState.OPEN

        server.start()  # same port, empty (no persistence)
        assert await cache.get(KEY) is None  # still open: not even asked
        clock.now += 5
        assert await cache.get(KEY) is None  # the probe reaches Redis: a plain miss closes the breaker
        assert state_of(cache.breaker) == BreakerState.CLOSED
        assert state() == 0
        await tiers.set("m", KEY, OUTPUTS, 60)
        await tiers.flush()
        assert got(await tiers.get("m", KEY)) == (VALUE, "redis")  # hits resume, same objects
        assert errors(metrics, "get") == 4
    finally:
        await tiers.close()


@pytest.mark.asyncio
async def test_restart_under_real_time_recovers(server: RedisServer) -> None:
    """The same, on the real clock and the configured reset, as a running server sees it."""
    metrics = Metrics(process=False)
    cache = build_cache(
        settings(server.url, memory_bytes=0, breaker_failures=2, breaker_reset_s=0.2), metrics
    )
    try:
        await cache.set("m", KEY, OUTPUTS, 60)
        await cache.flush()
        server.kill()
        for _ in range(5):
            assert await cache.get("m", KEY) == (None, "")
        server.start()
        deadline = time.monotonic() + 10
        while got(await cache.get("m", KEY)) != (VALUE, "redis"):
            assert time.monotonic() < deadline, "hits did not resume within 10 s"
            await cache.set("m", KEY, OUTPUTS, 60)
            await cache.flush()
            await asyncio.sleep(0.05)
    finally:
        await cache.close()
