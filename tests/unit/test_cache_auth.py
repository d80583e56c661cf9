"""Redis values authenticated with a MAC (``codec.ValueSealer``, ``RedisCache`` with a secret), and
arrays of strings in the cache value format.

A planted value, a value moved from another key, one written under another secret and one written
without a MAC are all misses, counted and logged (at most once a minute); the secret comes from a
setting or a file and never reaches a log or an error.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr, ValidationError

from conftest import FakeClock
from service.cache import RedisCache, TieredCache, build_cache, decode_outputs, encode_outputs, held_bytes
from service.cache.codec import CorruptCacheValue, ForgedCacheValue, ValueSealer
from service.cache.redis import read_secret
from service.config import CacheSettings, Settings
from service.errors import ConfigurationError
from service.metrics import Metrics

SECRET = b"0123456789abcdef-test-secret"
KEY = b"\x07" * 32
VALUE = encode_outputs({"y": np.array([[0.25, 0.75]], dtype=np.float32)})


class FakeRedis:
    """``get``/``set`` over a dict, as RedisCache calls them."""

    def __init__(self) -> None:
        self.data: dict[bytes, Any] = {}

    async def get(self, key: bytes) -> Any:
        return self.data.get(key)

    async def set(self, key: bytes, value: bytes, px: int) -> None:
        self.data[key] = value

    async def aclose(self) -> None:
        pass


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process=False)


def refused(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("ferry_cache_unauthenticated_total") or 0.0


def tier(fake: FakeRedis, metrics: Metrics, secret: bytes | None = SECRET, **kwargs: Any) -> RedisCache:
    sealer = ValueSealer(secret) if secret is not None else None
    return RedisCache(fake, metrics, sealer=sealer, **kwargs)  # type: ignore[arg-type]


# The sealer -----------------------------------------------------------------------------------------


def test_sealed_value_opens_under_its_key_only() -> None:
    sealer = ValueSealer(SECRET)
    sealed = sealer.seal(b"p:k1", VALUE)
    assert sealed.startswith(b"FRM1") and sealed.endswith(VALUE) and len(sealed) == len(VALUE) + 36
    assert sealer.open(b"p:k1", sealed) == VALUE
    with pytest.raises(ForgedCacheValue, match="does not verify"):
        sealer.open(b"p:k2", sealed)  # a genuine value moved to another key
    with pytest.raises(ForgedCacheValue, match="does not verify"):
        ValueSealer(SECRET + b"x").open(b"p:k1", sealed)  # another secret
    with pytest.raises(ForgedCacheValue, match="no MAC"):
        sealer.open(b"p:k1", VALUE)  # written without a secret
    assert issubclass(ForgedCacheValue, CorruptCacheValue)


def test_every_changed_byte_of_a_sealed_value_is_refused() -> None:
    sealer = ValueSealer(SECRET)
    sealed = sealer.seal(b"k", VALUE)
    for i in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(ForgedCacheValue):
            sealer.open(b"k", bytes(tampered))
    for end in range(len(sealed)):
        with pytest.raises(ForgedCacheValue):
            sealer.open(b"k", sealed[:end])
    with pytest.raises(ForgedCacheValue):
        sealer.open(b"k", sealed + b"\0")


def test_the_mac_is_hmac_sha256_over_the_length_prefixed_key_and_value() -> None:
    """Pinned: replicas of different Ferry versions sharing one Redis must agree on it. The tag is
    HMAC-SHA256(secret, "ferry-redis-value-v1" || u64le(len(key)) || key || value)."""
    sealed = ValueSealer(SECRET).seal(b"ferry:v1:00", b"FRY1")
    tag = "8e081f544962d7abb2b3c7c96bead5964caa0da6dd8f97325e48a68d25a9ef6d"
    assert sealed.hex() == "46524d31" + tag + "46525931"
    message = b"ferry-redis-value-v1" + struct.pack("<Q", 11) + b"ferry:v1:00" + b"FRY1"
    assert hmac.new(SECRET, message, hashlib.sha256).hexdigest() == tag


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        ValueSealer(b"short")


# The Redis tier with a secret -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_values_are_sealed_in_redis_and_opened_on_the_way_back(metrics: Metrics) -> None:
    fake = FakeRedis()
    cache = tier(fake, metrics, prefix="p:")
    assert cache.authenticated
    await cache.set(KEY, VALUE, 60)
    stored = fake.data[cache.redis_key(KEY)]
    assert stored == ValueSealer(SECRET).seal(cache.redis_key(KEY), VALUE)
    assert await cache.get(KEY) == VALUE
    assert refused(metrics) == 0


@pytest.mark.asyncio
async def test_planted_moved_foreign_and_unsigned_values_are_misses(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    fake, clock = FakeRedis(), FakeClock()
    cache = tier(fake, metrics, clock=clock)
    other_key = b"\x08" * 32
    await cache.set(other_key, encode_outputs({"y": np.array([[9.0, 9.0]], dtype=np.float32)}), 60)
    caplog.set_level(logging.WARNING, logger="service.cache")
    plants = [
        VALUE,  # what an attacker without the secret writes
        fake.data[cache.redis_key(other_key)],  # a genuine value moved to this key
        ValueSealer(b"another-secret-of-16+").seal(cache.redis_key(KEY), VALUE),
        b"FRM1" + bytes(32) + VALUE,
        b"",
    ]
    for planted in plants:
        fake.data[cache.redis_key(KEY)] = planted
        assert await cache.get(KEY) is None
    assert refused(metrics) == len(plants)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # rate-limited: the first at once, the rest counted
    assert "refused 1 value(s)" in warnings[0] and "no MAC" in warnings[0]
    clock.now += 60
    assert await cache.get(KEY) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and f"refused {len(plants)} value(s)" in warnings[1]
    assert SECRET.decode() not in caplog.text
    errors = metrics.registry.get_sample_value(
        "ferry_cache_errors_total", {"tier": "redis", "operation": "get"}
    )
    assert not errors  # a refusal is not a Redis failure: the breaker stays closed
    assert cache.breaker.allow()


@pytest.mark.asyncio
async def test_a_refused_value_is_a_miss_for_the_tiers_and_gets_overwritten(metrics: Metrics) -> None:
    fake = FakeRedis()
    redis = tier(fake, metrics)
    cache = TieredCache(None, redis, metrics)
    outputs = {"y": np.array([[1.0, 2.0]], dtype=np.float32)}
    fake.data[redis.redis_key(KEY)] = encode_outputs({"y": np.array([[6.0, 6.0]], dtype=np.float32)})
    assert await cache.get("m", KEY) == (None, "")
    await cache.set("m", KEY, outputs, 60)
    await cache.flush()
    found, where = await cache.get("m", KEY)
    assert where == "redis" and found is not None
    np.testing.assert_array_equal(found["y"], outputs["y"])
    assert refused(metrics) == 1


@pytest.mark.asyncio
async def test_without_a_secret_values_are_plain_and_sealed_ones_are_not_opened(metrics: Metrics) -> None:
    fake = FakeRedis()
    cache = tier(fake, metrics, secret=None)
    assert not cache.authenticated
    await cache.set(KEY, VALUE, 60)
    assert fake.data[cache.redis_key(KEY)] == VALUE  # the format of a Ferry without the setting
    sealed = ValueSealer(SECRET).seal(cache.redis_key(KEY), VALUE)
    fake.data[cache.redis_key(KEY)] = sealed
    assert await cache.get(KEY) == sealed  # handed on: the value codec finds it corrupt (a miss)
    with pytest.raises(CorruptCacheValue):
        decode_outputs(sealed)


# Settings: the secret, its file, the start-up warning ---------------------------------------------------


def test_secret_from_the_setting_or_a_file(tmp_path: Path) -> None:
    assert read_secret(CacheSettings()) is None
    assert read_secret(CacheSettings(redis_secret=SecretStr(SECRET.decode()))) == SECRET
    path = tmp_path / "redis-secret"
    path.write_bytes(SECRET + b"\n")  # as `kubectl create secret --from-file` of an echoed value
    assert read_secret(CacheSettings(redis_secret_file=str(path))) == SECRET
    path.write_bytes(SECRET + b"\r\n")
    assert read_secret(CacheSettings(redis_secret_file=str(path))) == SECRET


def test_bad_secret_settings_fail_at_start_up_without_quoting_the_secret(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not both"):
        CacheSettings(redis_secret=SecretStr(SECRET.decode()), redis_secret_file="/x")
    with pytest.raises(ValidationError, match="at least 16"):
        CacheSettings(redis_secret=SecretStr("short-pw"))
    missing = tmp_path / "absent"
    with pytest.raises(ConfigurationError, match="cannot read"):
        read_secret(CacheSettings(redis_secret_file=str(missing)))
    short = tmp_path / "short"
    short.write_bytes(b"short-pw\n")
    with pytest.raises(ConfigurationError, match="at least 16") as raised:
        read_secret(CacheSettings(redis_secret_file=str(short)))
    assert "short-pw" not in str(raised.value)


def test_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "s"
    path.write_bytes(SECRET)
    monkeypatch.setenv("FERRY_CACHE__REDIS_SECRET_FILE", str(path))
    assert read_secret(Settings().cache) == SECRET


@pytest.mark.asyncio
async def test_redis_without_a_secret_warns_at_start_up(
    metrics: Metrics, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.WARNING, logger="service.cache")
    plain = build_cache(Settings(redis_url=SecretStr("redis://:pw@127.0.0.1:1/0")), metrics)
    assert plain.redis is not None and not plain.redis.authenticated
    assert "not authenticated" in caplog.text and "FERRY_CACHE__REDIS_SECRET_FILE" in caplog.text
    await plain.close()
    caplog.clear()
    path = tmp_path / "s"
    path.write_bytes(SECRET)
    settings = Settings(
        redis_url=SecretStr("redis://127.0.0.1:1/0"), cache=CacheSettings(redis_secret_file=str(path))
    )
    sealed = build_cache(settings, metrics)
    assert sealed.redis is not None and sealed.redis.authenticated
    assert "not authenticated" not in caplog.text
    await sealed.close()
    caplog.clear()
    build_cache(Settings(), metrics)  # no Redis: nothing to warn about
    assert "not authenticated" not in caplog.text


# Arrays of strings in the value format ------------------------------------------------------------------


def labels(*items: str | None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array.reshape(shape if shape is not None else (len(items),))


@pytest.mark.parametrize(
    "array",
    [
        labels("cat", "dog", "cat"),
        labels("a", None, "", "naïve", "日本語", "🙂", shape=(2, 3)),
        labels("only", shape=()),
        labels(shape=(0, 4)),
        labels("x" * 100_000, None),
        labels("z", "y", "x", "w", shape=(2, 2)).T,  # not C-contiguous
    ],
    ids=["1-d", "2-d-none-unicode", "0-d", "empty", "long", "transposed"],
)
def test_string_arrays_round_trip(array: np.ndarray) -> None:
    outputs = {"label": array, "score": np.array([0.5, 0.25], dtype=np.float32)}
    data = encode_outputs(outputs)
    decoded = decode_outputs(data)
    assert list(decoded) == ["label", "score"]
    assert decoded["label"].dtype == object and decoded["label"].shape == array.shape
    assert decoded["label"].tolist() == array.tolist()
    assert all(type(item) in (str, type(None)) for item in decoded["label"].ravel().tolist())
    assert not decoded["label"].flags.writeable
    with pytest.raises(ValueError):
        decoded["label"].reshape(-1)[0] = "changed"
    assert encode_outputs(decoded) == data
    assert b"pickle" not in data and b"numpy" not in data


def test_string_array_layout_is_length_prefixed() -> None:
    data = encode_outputs({"l": labels("ab", None, "c")})
    head = b"FRY1\x01\0\0\0" + b"\x01\0\x03\x01" + b"lstr" + (3).to_bytes(8, "little")
    assert data.startswith(head)
    body = data[len(head) + (-len(head) % 8) :]
    lengths = np.frombuffer(body, "<i8", 3)
    assert lengths.tolist() == [2, -1, 1]
    assert body[24:] == b"abc"


def test_string_arrays_count_their_strings_in_held_bytes() -> None:
    small = decode_outputs(encode_outputs({"l": labels("a", "b")}))
    large = decode_outputs(encode_outputs({"l": labels("a" * 10_000, "b" * 10_000)}))
    assert held_bytes(large) - held_bytes(small) >= 2 * (10_000 - 1)


@pytest.mark.parametrize(
    "array",
    [
        np.array(["fixed", "width"]),  # numpy's fixed-width strings: a model hands out objects
        np.array([b"bytes"], dtype=object),
        np.array([1, "a"], dtype=object),
        np.array([object()], dtype=object),
        labels("\ud800"),  # a lone surrogate is not text
    ],
    ids=["fixed-width", "bytes", "mixed", "object", "surrogate"],
)
def test_what_is_not_strings_stays_uncacheable(array: np.ndarray) -> None:
    with pytest.raises(TypeError):
        encode_outputs({"y": array})


@pytest.mark.parametrize(
    "body",
    [
        (2).to_bytes(8, "little") + (-2).to_bytes(8, "little", signed=True) + b"ab",  # length below -1
        (5).to_bytes(8, "little") + (1).to_bytes(8, "little") + b"abc",  # past the end
        (2**62).to_bytes(8, "little") + (2**62).to_bytes(8, "little"),  # absurd
        (2).to_bytes(8, "little") + (0).to_bytes(8, "little") + b"\xff\xfe",  # not UTF-8
        (1).to_bytes(8, "little") + (0).to_bytes(8, "little") + b"ab",  # trailing bytes
        (1).to_bytes(8, "little"),  # a second length missing
    ],
    ids=["negative", "short", "absurd", "utf8", "trailing", "truncated"],
)
def test_foreign_string_arrays_are_corrupt(body: bytes) -> None:
    head = b"FRY1\x01\0\0\0" + b"\x01\0\x03\x01" + b"lstr" + (2).to_bytes(8, "little")
    with pytest.raises(CorruptCacheValue):
        decode_outputs(head + bytes(-len(head) % 8) + body)


def test_absurd_string_count_is_corrupt_without_allocating() -> None:
    head = b"FRY1\x01\0\0\0" + b"\x01\0\x03\x02" + b"lstr" + (2**40).to_bytes(8, "little") * 2
    with pytest.raises(CorruptCacheValue):
        decode_outputs(head + bytes(-len(head) % 8) + bytes(16))


@pytest.mark.asyncio
async def test_string_outputs_are_cached_in_both_tiers(metrics: Metrics) -> None:
    fake = FakeRedis()
    redis = tier(fake, metrics)
    cache = TieredCache(build_cache(Settings(), metrics).memory, redis, metrics)
    outputs = {"label": labels("spam", "ham", None)}
    await cache.set("m", KEY, outputs, 60)
    await cache.flush()
    found, where = await cache.get("m", KEY)
    assert where == "memory" and found is not None and found["label"].tolist() == ["spam", "ham", None]
    assert cache.memory is not None
    cache.memory.clear()
    found, where = await cache.get("m", KEY)
    assert where == "redis" and found is not None and found["label"].tolist() == ["spam", "ham", None]
