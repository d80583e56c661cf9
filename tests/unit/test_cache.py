"""Unit tests of service/cache/: key, codec, breaker, Redis tier (fake client), tiers, single-flight.

The LRU and the memory bounds: ``test_cache_lru.py``.

Deterministic: injectable clocks and ``asyncio.Event`` gates; the only waits are Redis timeouts under test.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from conftest import FakeClock, state_of
from service.cache import (
    ENTRY_BYTES,
    BreakerState,
    CircuitBreaker,
    CorruptCacheValue,
    Outputs,
    RedisCache,
    SingleFlight,
    TieredCache,
    build_cache,
    cache_key,
    decode_outputs,
    encode_outputs,
    held_bytes,
    memory_tier,
    redact_url,
)
from service.config import CacheSettings, ModelCacheSettings, Settings
from service.errors import ConfigurationError
from service.metrics import Metrics


class FakeRedis:
    """The two commands RedisCache uses; can fail, or hang until a gate opens."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.ttls: dict[bytes, int] = {}
        self.calls = 0
        self.error: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.closed = False

    async def _enter(self) -> None:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error

    async def get(self, key: bytes) -> Any:
        await self._enter()
        return self.data.get(key)

    async def set(self, key: bytes, value: bytes, px: int) -> None:
        await self._enter()
        self.data[key], self.ttls[key] = value, px

    async def aclose(self) -> None:
        self.closed = True


def outputs(x: float = 1.0) -> Outputs:
    return {"y": np.array([[x, 2 * x]], dtype=np.float32)}


def value(model: str = "m", x: float = 1.0) -> bytes:
    return encode_outputs(outputs(x))


def got(result: tuple[Outputs | None, str]) -> tuple[bytes | None, str]:
    """A tier's answer with its outputs encoded, to compare with ``value()``."""
    found, tier = result
    return (None if found is None else encode_outputs(found)), tier


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def redis_cache(fake: FakeRedis, metrics: Metrics, clock: FakeClock, **kwargs: Any) -> RedisCache:
    kwargs.setdefault("timeout_s", 1.0)
    kwargs.setdefault("breaker_failures", 3)
    kwargs.setdefault("breaker_reset_s", 5.0)
    return RedisCache(fake, metrics, clock=clock, **kwargs)  # type: ignore[arg-type]


# Keys ---------------------------------------------------------------------------------------------


def x(json: str, dtype: str = "<f4") -> np.ndarray:
    return np.asarray(orjson.loads(json), dtype=dtype)


def test_key_is_32_bytes_and_stable_across_json_spellings_layout_and_order() -> None:
    key = cache_key("m", "3", {"a": x("[[1, 2], [3, 4]]"), "b": x("[5]")}, {"k": 1, "j": [1, 2]})
    assert len(key) == 32
    spellings = [
        ({"b": x("[5.0]"), "a": x("[[1.0, 2e0], [3.00, 0.4e1]]")}, {"j": [1, 2], "k": 1}),
        ({"a": np.asfortranarray(x("[[1, 2], [3, 4]]")), "b": x("[5]", ">f4")}, {"k": 1, "j": [1, 2]}),
        ({"a": x("[[1, 3], [2, 4]]").T, "b": x("[5, 6]")[:1]}, {"k": 1, "j": [1, 2]}),
    ]
    for inputs, params in spellings:
        assert cache_key("m", "3", inputs, params) == key


@pytest.mark.parametrize(
    "change",
    [
        {"model": "n"},
        {"version": "4"},
        {"inputs": {"a": x("[[1, 2, 3]]", "<f8")}},
        {"inputs": {"a": x("[[1, 2, 3]]", "<i4")}},
        {"inputs": {"a": x("[[1], [2], [3]]")}},
        {"inputs": {"a": x("[1, 2, 3]")}},
        {"inputs": {"b": x("[[1, 2, 3]]")}},
        {"inputs": {"a": x("[[1, 2, 4]]")}},
        {"inputs": {"a": x("[[1, 2, 3]]"), "b": x("[]")}},
        {"params": {"t": 1}},
        {"params": {"t": 1.5}},
    ],
)
def test_key_changes_with_every_field(change: dict[str, Any]) -> None:
    base: dict[str, Any] = {"model": "m", "version": "3", "inputs": {"a": x("[[1, 2, 3]]")}, "params": None}
    assert cache_key(**base) != cache_key(**(base | change))


def test_key_params_none_and_empty_agree() -> None:
    inputs = {"a": x("[1]")}
    assert cache_key("m", "1", inputs, None) == cache_key("m", "1", inputs, {})


def test_key_fields_are_length_prefixed() -> None:
    one = {"a": x("[1]")}
    assert cache_key("ab", "c", one, None) != cache_key("a", "bc", one, None)
    split = {"a": np.frombuffer(b"ab" * 4, "<f4"), "b": np.frombuffer(b"cd" * 4, "<f4")}
    joined = {"a": np.frombuffer(b"ab" * 4 + b"cd" * 2, "<f4"), "b": np.frombuffer(b"cd" * 2, "<f4")}
    assert cache_key("m", "1", split, None) != cache_key("m", "1", joined, None)


def test_key_accepts_strings_bool_and_scalars_rejects_object() -> None:
    inputs = {"s": np.array(["ab", "c"]), "b": np.array([True]), "n": np.array(3.0)}
    assert cache_key("m", "1", inputs, None) == cache_key(
        "m", "1", inputs | {"n": np.array(3.0, ">f8")}, None
    )
    assert cache_key("m", "1", inputs, None) != cache_key("m", "1", inputs | {"n": np.array([3.0])}, None)
    with pytest.raises(TypeError, match="'o'"):
        cache_key("m", "1", {"o": np.array([{}, 1], dtype=object)}, None)


def test_key_bytes_are_those_of_ferry_key_v1() -> None:
    """Existing entries (a shared Redis) stay reachable: the digest was computed by the code before
    the cache became a package (service/cache.py at 96bf2b5)."""
    inputs = {
        "x": np.array([[1.0, 2.0]], dtype=np.float32),
        "ids": np.array([7, -1], dtype=">i8"),
        "s": np.array(["ab", "c"]),
    }
    key = cache_key("fraud", "3", inputs, {"threshold": 0.5, "top": [1, 2]})
    assert key.hex() == "3b67da3713629aa17d6fea7e6650377f9ad741b44c30f1d5133b39dfda934484"


# Values -------------------------------------------------------------------------------------------

DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_round_trip(dtype: str) -> None:
    rng = np.random.default_rng(0)
    outputs = {
        "y": (rng.standard_normal((3, 4)) * 50).astype(dtype),
        "scalar": np.array(7, dtype=dtype),
        "empty": np.zeros((0, 5), dtype=dtype),
        "strided": (rng.standard_normal((4, 6)) * 50).astype(dtype)[::2, ::3],
        "big": np.arange(5).astype(np.dtype(dtype).newbyteorder(">")),
    }
    data = encode_outputs(outputs)
    assert data[:4] == b"FRY1"
    decoded = decode_outputs(data)
    assert list(decoded) == list(outputs)
    for name, array in outputs.items():
        assert decoded[name].shape == array.shape
        assert decoded[name].dtype == array.dtype.newbyteorder("<")
        np.testing.assert_array_equal(decoded[name], array)
        assert not decoded[name].flags.writeable


OLD_VALUE = bytes.fromhex(
    "465259310300000001000302793c663401000000000000000200000000000000050003016c6162656c3c69380100000000"
    "000000020003006f6b7c62310000000000803e0000c0bf030000000000000001"
)
"""``encode_outputs`` of y, label and ok below, written by service/cache.py at 96bf2b5."""


def test_values_written_before_the_package_still_decode_and_encode_the_same() -> None:
    decoded = decode_outputs(OLD_VALUE)
    assert list(decoded) == ["y", "label", "ok"]
    np.testing.assert_array_equal(decoded["y"], np.array([[0.25, -1.5]], dtype=np.float32))
    assert decoded["y"].dtype == np.float32
    np.testing.assert_array_equal(decoded["label"], np.array([3], dtype=np.int64))
    assert decoded["ok"].shape == () and decoded["ok"].dtype == np.bool_ and bool(decoded["ok"])
    assert encode_outputs(decoded) == OLD_VALUE


def test_values_are_not_pickle_and_pickle_is_corrupt() -> None:
    outputs = {"y": np.arange(4, dtype=np.float32)}
    data = encode_outputs(outputs)
    assert b"numpy" not in data
    assert not data.startswith(b"\x80")
    with pytest.raises(CorruptCacheValue):
        decode_outputs(pickle.dumps(outputs))


def test_every_truncation_or_extension_is_corrupt() -> None:
    data = encode_outputs({"y": np.arange(6, dtype=np.float64).reshape(2, 3), "z": np.array([True])})
    for end in range(len(data)):
        with pytest.raises(CorruptCacheValue):
            decode_outputs(data[:end])
    with pytest.raises(CorruptCacheValue):
        decode_outputs(data + b"\0")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"FRY2" + bytes(4),
        b'{"y": [1, 2]}',
        b"FRY1\x01\0\0\0\x01\0\x03\x01y|O8" + bytes(8),  # object dtype
        b"FRY1\x01\0\0\0\x01\0\x03\x01y>f4\x01" + bytes(7) + bytes(4),  # big-endian header
        b"FRY1\x02\0\0\0\x01\0\x03\x00y<f4\x01\0\x03\x00y<f4" + bytes(8),  # repeated name
        b"FRY1\x01\0\0\0\x01\0\x03\x01y<f4" + b"\xff" * 8,  # absurd shape
        b"FRY1\x01\0\0\0\x01\0\x03\x01\xffy<f4" + bytes(8),  # bad utf-8 name
    ],
)
def test_foreign_values_are_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptCacheValue):
        decode_outputs(data)
    assert issubclass(CorruptCacheValue, ValueError)


def test_random_bytes_are_corrupt() -> None:
    rng = np.random.default_rng(1)
    for size in range(0, 200, 3):
        with pytest.raises(CorruptCacheValue):
            decode_outputs(b"FRY1" + rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def test_encode_refuses_object_and_string_outputs() -> None:
    for array in (np.array([object()]), np.array(["a"])):
        with pytest.raises(TypeError):
            encode_outputs({"y": array})


# Breaker ------------------------------------------------------------------------------------------


def breaker(clock: FakeClock, changes: list[tuple[str, str]]) -> CircuitBreaker:
    return CircuitBreaker(
        3, 5.0, clock=clock, on_change=lambda old, new, _: changes.append((old.name, new.name))
    )


def test_breaker_opens_after_consecutive_failures_only(clock: FakeClock) -> None:
    changes: list[tuple[str, str]] = []
    b = breaker(clock, changes)
    for _ in range(5):
        b.failure()
        b.failure()
        b.success()
    assert state_of(b) == BreakerState.CLOSED
    assert b.allow()
    b.failure()
    b.failure()
    b.failure()
    assert state_of(b) == BreakerState.OPEN
    assert changes == [("CLOSED", "OPEN")]
    assert not b.allow()
    assert b.rejecting()


def test_breaker_probe_closes_on_success(clock: FakeClock) -> None:
    changes: list[tuple[str, str]] = []
    b = breaker(clock, changes)
    for _ in range(3):
        b.failure()
    clock.now += 4.99
    assert not b.allow()
    clock.now += 0.01
    assert not b.rejecting()  # looking does not start the probe
    assert state_of(b) == BreakerState.OPEN
    assert b.allow()  # the one probe
    assert state_of(b) == BreakerState.HALF_OPEN
    assert not b.allow()
    assert b.rejecting()
    b.success()
    assert state_of(b) == BreakerState.CLOSED
    assert b.allow()
    assert changes == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED")]


def test_breaker_probe_failure_reopens_for_a_full_period(clock: FakeClock) -> None:
    changes: list[tuple[str, str]] = []
    b = breaker(clock, changes)
    for _ in range(3):
        b.failure()
    clock.now += 5
    assert b.allow()
    clock.now += 1
    b.failure()
    assert state_of(b) == BreakerState.OPEN
    clock.now += 4.99
    assert not b.allow()
    clock.now += 0.01
    assert b.allow()
    assert changes[-2:] == [("HALF_OPEN", "OPEN"), ("OPEN", "HALF_OPEN")]


def test_breaker_abandoned_probe_lets_another_probe(clock: FakeClock) -> None:
    b = breaker(clock, [])
    for _ in range(3):
        b.failure()
    clock.now += 5
    assert b.allow()
    assert not b.allow()
    b.abandon()
    assert b.allow()
    assert state_of(b) == BreakerState.HALF_OPEN


# Redis tier (fake client) -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redis_get_set_and_ttl(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    cache = redis_cache(fake, metrics, clock, prefix="p:")
    key = b"\x01" * 32
    assert await cache.get(key) is None
    await cache.set(key, b"v", 1.5)
    assert fake.data == {b"p:" + b"01" * 32: b"v"}
    assert fake.ttls[b"p:" + b"01" * 32] == 1500
    assert await cache.get(key) == b"v"
    assert sample(metrics, "ferry_cache_redis_duration_seconds_count", operation="get") == 2
    assert sample(metrics, "ferry_cache_redis_duration_seconds_count", operation="set") == 1
    await cache.close()
    assert fake.closed


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [RedisConnectionError("down"), OSError("reset"), RuntimeError("bug")])
async def test_redis_errors_fail_open_and_open_the_breaker(
    error: Exception, metrics: Metrics, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeRedis()
    fake.error = error
    cache = redis_cache(fake, metrics, clock)
    caplog.set_level(logging.DEBUG, logger="service.cache")
    for _ in range(50):
        assert await cache.get(b"k") is None
        await cache.set(b"k", b"v", 1)
    assert fake.calls == 3  # then the breaker skips Redis
    assert state_of(cache.breaker) == BreakerState.OPEN
    assert sample(metrics, "ferry_cache_breaker_state") == 2
    assert sample(metrics, "ferry_cache_errors_total", tier="redis", operation="get") == 2
    assert sample(metrics, "ferry_cache_errors_total", tier="redis", operation="set") == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "failing" in warnings[0].getMessage()

    clock.now += 5  # the probe fails: open again, no new warning
    assert await cache.get(b"k") is None
    assert fake.calls == 4
    assert state_of(cache.breaker) == BreakerState.OPEN
    clock.now += 5  # Redis is back: the probe closes the breaker
    fake.error = None
    fake.data[cache.redis_key(b"k")] = b"v"
    assert await cache.get(b"k") == b"v"
    assert state_of(cache.breaker) == BreakerState.CLOSED
    assert sample(metrics, "ferry_cache_breaker_state") == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "recovered" in warnings[1].getMessage()


@pytest.mark.asyncio
async def test_redis_timeout_bounds_each_call(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    fake.gate = asyncio.Event()  # never opened: Redis hangs
    cache = redis_cache(fake, metrics, clock, timeout_s=0.01)
    async with asyncio.timeout(5):
        assert await cache.get(b"k") is None
        await cache.set(b"k", b"v", 1)
    assert sample(metrics, "ferry_cache_errors_total", tier="redis", operation="get") == 1
    assert sample(metrics, "ferry_cache_errors_total", tier="redis", operation="set") == 1


@pytest.mark.asyncio
async def test_redis_response_error_is_counted_but_keeps_the_breaker_closed(
    metrics: Metrics, clock: FakeClock
) -> None:
    fake = FakeRedis()
    fake.error = ResponseError("WRONGTYPE")
    cache = redis_cache(fake, metrics, clock)
    for _ in range(10):
        assert await cache.get(b"k") is None
    assert fake.calls == 10
    assert state_of(cache.breaker) == BreakerState.CLOSED
    assert sample(metrics, "ferry_cache_errors_total", tier="redis", operation="get") == 10


@pytest.mark.asyncio
async def test_redis_non_bytes_value_is_a_miss(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    cache = redis_cache(fake, metrics, clock)
    fake.data[cache.redis_key(b"k")] = "text"  # type: ignore[assignment]
    assert await cache.get(b"k") is None


@pytest.mark.asyncio
async def test_redis_cancelled_probe_lets_the_next_call_probe(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    fake.error = RedisConnectionError("down")
    cache = redis_cache(fake, metrics, clock)
    for _ in range(3):
        await cache.get(b"k")
    clock.now += 5
    fake.error, fake.gate = None, asyncio.Event()
    fake.entered.clear()
    probe = asyncio.create_task(cache.get(b"k"))
    await fake.entered.wait()
    assert state_of(cache.breaker) == BreakerState.HALF_OPEN
    assert await cache.get(b"k") is None  # skipped while the probe runs
    assert fake.calls == 4
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    fake.gate = None
    assert await cache.get(b"k") is None  # a new probe reaches Redis and closes the breaker
    assert fake.calls == 5
    assert state_of(cache.breaker) == BreakerState.CLOSED


@pytest.mark.asyncio
async def test_redis_url_password_never_logged(metrics: Metrics, caplog: pytest.LogCaptureFixture) -> None:
    settings = CacheSettings(breaker_failures=1, redis_timeout_ms=500)
    cache = RedisCache.from_url("unix://:hunter2@/nonexistent/ferry.sock?db=3", settings, metrics)
    caplog.set_level(logging.DEBUG, logger="service.cache")
    assert await cache.get(b"k") is None
    assert state_of(cache.breaker) == BreakerState.OPEN
    await cache.close()
    assert cache.name == "unix:///nonexistent/ferry.sock"
    assert caplog.records
    assert "hunter2" not in caplog.text
    assert redact_url("rediss://user:pw@cache.example:6380/2?password=pw") == "rediss://cache.example:6380/2"
    assert redact_url("redis://:pw@[::1]:6379") == "redis://[::1]:6379"


def test_redis_url_with_another_scheme_is_a_configuration_error(metrics: Metrics) -> None:
    with pytest.raises(ConfigurationError) as raised:
        RedisCache.from_url("http://:hunter2@localhost", CacheSettings(), metrics)
    assert "hunter2" not in str(raised.value)


# Tiers --------------------------------------------------------------------------------------------


def tiered(metrics: Metrics, clock: FakeClock, fake: FakeRedis | None, **kwargs: Any) -> TieredCache:
    redis = redis_cache(fake, metrics, clock) if fake is not None else None
    return TieredCache(memory_tier(10_000, clock=clock), redis, metrics, **kwargs)


@pytest.mark.asyncio
async def test_tiers_miss_store_and_hit(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    cache = tiered(metrics, clock, fake)
    assert await cache.get("m", b"k") == (None, "")
    await cache.set("m", b"k", outputs(), 60)
    await cache.flush()
    assert fake.data[cache.redis.redis_key(b"k")] == value()  # type: ignore[union-attr]
    assert got(await cache.get("m", b"k")) == (value(), "memory")
    lookups = {
        (tier, result): sample(metrics, "ferry_cache_lookups_total", model="m", tier=tier, result=result)
        for tier in ("memory", "redis")
        for result in ("hit", "miss")
    }
    assert lookups == {("memory", "hit"): 1, ("memory", "miss"): 1, ("redis", "hit"): 0, ("redis", "miss"): 1}
    await cache.close()
    assert fake.closed


@pytest.mark.asyncio
async def test_redis_hit_fills_memory_with_the_model_ttl(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    settings = CacheSettings(ttl_s=100, models={"m": ModelCacheSettings(ttl_s=10)})
    cache = tiered(metrics, clock, fake, settings=settings)
    fake.data[cache.redis.redis_key(b"k")] = value()  # type: ignore[union-attr]
    assert got(await cache.get("m", b"k")) == (value(), "redis")
    fake.data.clear()
    assert got(await cache.get("m", b"k")) == (value(), "memory")
    clock.now += 10
    assert await cache.get("m", b"k") == (None, "")


@pytest.mark.asyncio
async def test_corrupt_redis_value_is_a_miss_and_overwritten(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    cache = tiered(metrics, clock, fake)
    redis_key = cache.redis.redis_key(b"k")  # type: ignore[union-attr]
    fake.data[redis_key] = pickle.dumps({"y": [1]})
    assert await cache.get("m", b"k") == (None, "")
    assert cache.memory.entries == 0  # type: ignore[union-attr]
    assert sample(metrics, "ferry_cache_errors_total", tier="redis", operation="get") == 1
    await cache.set("m", b"k", outputs(), 60)
    await cache.flush()
    assert fake.data[redis_key] == value()


@pytest.mark.asyncio
async def test_redis_writes_do_not_delay_set_and_are_bounded(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    fake.gate = asyncio.Event()
    cache = tiered(metrics, clock, fake, max_pending_writes=2)
    for i in range(3):
        await cache.set("m", b"k%d" % i, outputs(i), 60)  # returns although Redis hangs
    assert cache.pending_writes == 2
    assert sample(metrics, "ferry_cache_errors_total", tier="redis", operation="set") == 1
    assert got(await cache.get("m", b"k2")) == (value(x=2), "memory")
    fake.gate.set()
    await cache.flush()
    assert cache.pending_writes == 0
    assert sorted(fake.data) == [cache.redis.redis_key(b"k%d" % i) for i in (0, 1)]  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_no_background_write_while_the_breaker_is_open(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    fake.error = RedisConnectionError("down")
    cache = tiered(metrics, clock, fake)
    for _ in range(3):
        await cache.get("m", b"k")
    await cache.set("m", b"k", outputs(), 60)
    assert cache.pending_writes == 0
    assert fake.calls == 3
    clock.now += 5
    fake.error = None
    await cache.set("m", b"k", outputs(), 60)  # the write is the probe
    await cache.flush()
    assert state_of(cache.redis.breaker) == BreakerState.CLOSED  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_memory_only_and_no_tiers(metrics: Metrics, clock: FakeClock) -> None:
    memory_only = tiered(metrics, clock, None)
    await memory_only.set("m", b"k", outputs(), 60)
    assert got(await memory_only.get("m", b"k")) == (value(), "memory")
    nothing = TieredCache(None, None, metrics)
    await nothing.set("m", b"k", outputs(), 60)
    assert await nothing.get("m", b"k") == (None, "")
    await nothing.close()


@pytest.mark.asyncio
async def test_hits_are_read_only_and_their_dict_is_the_callers(metrics: Metrics, clock: FakeClock) -> None:
    fake = FakeRedis()
    cache = tiered(metrics, clock, fake)
    fake.data[cache.redis.redis_key(b"k")] = value()  # type: ignore[union-attr]
    for tier in ("redis", "memory"):
        found, where = await cache.get("m", b"k")
        assert found is not None and where == tier
        with pytest.raises(ValueError):
            found["y"][0, 0] = 9  # the array is read-only
        with pytest.raises(ValueError):
            found["y"].flags.writeable = True
        found["z"] = found.pop("y")  # the caller's own dict: the cache's is untouched
    assert got(await cache.get("m", b"k")) == (value(), "memory")


@pytest.mark.asyncio
async def test_a_redis_hit_is_decoded_once_and_memory_hits_not_at_all(
    metrics: Metrics, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.cache.tiered as tiered_module

    decoded: list[bytes] = []

    def counting(data: bytes) -> Outputs:
        decoded.append(data)
        return decode_outputs(data)

    monkeypatch.setattr(tiered_module, "decode_outputs", counting)
    fake = FakeRedis()
    cache = tiered(metrics, clock, fake)
    fake.data[cache.redis.redis_key(b"k")] = value()  # type: ignore[union-attr]
    assert got(await cache.get("m", b"k")) == (value(), "redis")
    assert decoded == [value()]
    for _ in range(3):
        assert got(await cache.get("m", b"k")) == (value(), "memory")
    assert decoded == [value()]


@pytest.mark.asyncio
async def test_set_keeps_a_compact_copy_not_the_models_batch(metrics: Metrics, clock: FakeClock) -> None:
    batch = np.arange(100_000, dtype=np.float64).reshape(1000, 100)  # a batch's output, 800 kB
    cache = tiered(metrics, clock, None)
    await cache.set("m", b"k", {"y": batch[3:4]}, 60)  # one request's rows: a view into the batch
    assert cache.memory is not None and cache.memory.bytes < 2_000
    batch[3, 0] = -1.0  # the model's buffer being reused does not reach the cache
    found, _ = await cache.get("m", b"k")
    assert found is not None and found["y"][0, 0] == 300.0
    with pytest.raises(TypeError):
        await cache.set("m", b"s", {"y": np.array(["a"])}, 60)  # strings: the caller computes them each time
    assert cache.memory.get(b"s") is None


def test_per_model_policy(metrics: Metrics) -> None:
    settings = CacheSettings(
        enabled=False,
        ttl_s=30,
        models={"a": ModelCacheSettings(enabled=True, ttl_s=5), "b": ModelCacheSettings(ttl_s=7)},
    )
    cache = TieredCache(None, None, metrics, settings=settings)
    assert [cache.enabled(m) for m in ("a", "b", "c")] == [True, False, False]
    assert [cache.ttl_s(m) for m in ("a", "b", "c")] == [5, 7, 30]


@pytest.mark.asyncio
async def test_build_cache(metrics: Metrics) -> None:
    cache = build_cache(Settings(), metrics)
    assert cache.memory is not None
    assert cache.redis is None
    await cache.set("m", b"k", outputs(), 60)
    assert sample(metrics, "ferry_cache_memory_entries") == 1
    assert sample(metrics, "ferry_cache_memory_bytes") == ENTRY_BYTES + 1 + held_bytes(
        decode_outputs(value())
    )

    assert build_cache(Settings(cache=CacheSettings(memory_bytes=0)), metrics).memory is None
    off = build_cache(Settings(cache=CacheSettings(enabled=False), redis_url=SecretStr("redis://x")), metrics)
    assert off.memory is None
    assert off.redis is None

    with_redis = build_cache(Settings(redis_url=SecretStr("redis://:pw@127.0.0.1:1/2")), metrics)
    assert with_redis.redis is not None
    assert with_redis.redis.name == "redis://127.0.0.1:1/2"
    await with_redis.close()


# Single-flight ------------------------------------------------------------------------------------


class Gated:
    """An ``fn`` for SingleFlight that blocks on a gate and counts its calls."""

    def __init__(self, result: object = "result", error: Exception | None = None) -> None:
        self.gate, self.started = asyncio.Event(), asyncio.Event()
        self.calls = self.cancelled = 0
        self.result, self.error = result, error
        self.gone: Callable[[], bool] | None = None

    async def __call__(self, gone: Callable[[], bool] | None = None) -> object:
        self.calls += 1
        self.gone = gone
        self.started.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.error is not None:
            raise self.error
        return self.result


async def start(
    flight: SingleFlight, key: bytes, fn: Callable[..., Any], n: int, probes: list[Any] | None = None
) -> list[asyncio.Task[Any]]:
    tasks = [asyncio.create_task(flight.run(key, fn, probe)) for probe in probes or [None] * n]
    for _ in range(3):
        await asyncio.sleep(0)  # let each task reach its await (scheduling, not timing)
    return tasks


@pytest.mark.asyncio
async def test_single_flight_shares_one_call(metrics: Metrics) -> None:
    flight, fn, other = SingleFlight(metrics, "m"), Gated(), Gated("other")
    tasks = await start(flight, b"k", fn, 4)
    other_task = asyncio.create_task(flight.run(b"j", other))
    await fn.started.wait()
    await other.started.wait()
    assert len(flight) == 2
    fn.gate.set()
    other.gate.set()
    assert await asyncio.gather(*tasks) == ["result"] * 4
    assert await other_task == "other"
    assert (fn.calls, other.calls, len(flight)) == (1, 1, 0)
    assert sample(metrics, "ferry_cache_coalesced_total", model="m") == 3
    again = Gated("again")
    again.gate.set()
    assert await flight.run(b"k", again) == "again"  # results are not kept after the flight


@pytest.mark.asyncio
async def test_single_flight_failure_reaches_every_waiter() -> None:
    flight, fn = SingleFlight(), Gated(error=KeyError("boom"))
    tasks = await start(flight, b"k", fn, 3)
    fn.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [type(r) for r in results] == [KeyError] * 3
    assert fn.calls == 1
    assert len(flight) == 0


@pytest.mark.asyncio
async def test_single_flight_cancelled_leader_does_not_cancel_the_work() -> None:
    flight, fn = SingleFlight(), Gated()
    leader, *waiters = await start(flight, b"k", fn, 3)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    waiters[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiters[0]
    fn.gate.set()
    assert await waiters[1] == "result"
    assert (fn.calls, fn.cancelled) == (1, 0)


@pytest.mark.asyncio
async def test_single_flight_last_waiter_leaving_cancels_the_work() -> None:
    flight, fn = SingleFlight(), Gated()
    tasks = await start(flight, b"k", fn, 2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert len(flight) == 0
    for _ in range(3):
        await asyncio.sleep(0)
    assert fn.cancelled == 1
    fresh = Gated("fresh")
    fresh.gate.set()
    assert await flight.run(b"k", fresh) == "fresh"


@pytest.mark.asyncio
async def test_single_flight_work_counts_as_abandoned_only_when_every_waiter_is_gone() -> None:
    flight, fn = SingleFlight(), Gated()
    gone = [False, False]
    tasks = await start(flight, b"k", fn, 2, probes=[lambda: gone[0], lambda: gone[1]])
    await fn.started.wait()
    assert fn.gone is not None and not fn.gone()
    gone[0] = True  # the first client hung up; the second still waits
    assert not fn.gone()
    gone[1] = True
    assert fn.gone()
    fn.gate.set()
    assert await asyncio.gather(*tasks) == ["result"] * 2


@pytest.mark.asyncio
async def test_single_flight_with_a_waiter_that_brought_no_probe_is_never_abandoned() -> None:
    flight, fn = SingleFlight(), Gated()
    tasks = await start(flight, b"k", fn, 2, probes=[lambda: True, None])
    await fn.started.wait()
    assert fn.gone is not None and not fn.gone()
    fn.gate.set()
    assert await asyncio.gather(*tasks) == ["result"] * 2
    lone = Gated("lone")
    lone.gate.set()
    assert await flight.run(b"j", lone) == "lone" and lone.gone is None  # no probe, none passed on
