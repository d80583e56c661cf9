"""Prediction cache: key function, value codec, in-process LRU, Redis tier, two-tier composition.

Keys hash the model name, resolved version, every input's name, dtype, shape and raw bytes, and the
params, so a new version never sees an old version's entries. Values are a small header plus raw array
bytes, never pickle; anything else read back is ``CorruptCacheValue`` and counts as a miss. Redis is
optional and fails open: each call is bounded by a timeout, a circuit breaker skips Redis for a while
after repeated failures, and no Redis error ever reaches a request. This is the only importer of
``redis``. Everything here runs on the event loop's thread (not thread-safe).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import logging
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import numpy as np
import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from service.config import CacheSettings, Settings
from service.errors import ConfigurationError
from service.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")
Clock = Callable[[], float]

_U64: Final = struct.Struct("<Q")
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
_KEY_KINDS: Final = frozenset("biufcSU")


class CorruptCacheValue(ValueError):
    """A cached value that is not one ``encode_outputs`` wrote (foreign, truncated or tampered)."""


def _little(array: np.ndarray) -> np.ndarray:
    """The array as little-endian C-contiguous memory (no copy when it already is)."""
    if array.dtype.str[0] == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def cache_key(
    model: str, version: str, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None
) -> bytes:
    """32-byte BLAKE2b of the canonical request; every field is length-prefixed.

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
        array = _little(array)
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


def encode_outputs(outputs: Mapping[str, np.ndarray]) -> bytes:
    """``FRY1``, count, then per output name, dtype and shape; then each array's bytes, 8-byte aligned."""
    head = [_VALUE_HEAD.pack(_MAGIC, len(outputs))]
    arrays = []
    for name, array in outputs.items():
        array = _little(np.asarray(array))
        if array.dtype.str not in _VALUE_DTYPES or array.ndim > _MAX_NDIM:
            raise TypeError(f"output {name!r} of dtype {array.dtype} cannot be cached")
        name_bytes, dtype_bytes = name.encode(), array.dtype.str.encode()
        head.append(_OUTPUT_HEAD.pack(len(name_bytes), len(dtype_bytes), array.ndim))
        head += (name_bytes, dtype_bytes, struct.pack(f"<{array.ndim}Q", *array.shape))
        arrays.append(array)
    parts, size = head, sum(map(len, head))
    for array in arrays:
        parts.append(bytes(-size % 8))
        parts.append(array.tobytes())
        size += -size % 8 + array.nbytes
    return b"".join(parts)


def decode_outputs(data: bytes) -> dict[str, np.ndarray]:
    """What ``encode_outputs`` wrote, as read-only views on ``data``; ``CorruptCacheValue`` otherwise."""
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
            dtype = _VALUE_DTYPES.get(data[pos + name_len : end].decode("ascii"))
            shape = struct.unpack_from(f"<{ndim}Q", data, end)
            pos = end + 8 * ndim
            if dtype is None:
                raise CorruptCacheValue("dtype not allowed")
            specs.append((name, dtype, shape))
        outputs = {}
        for name, dtype, shape in specs:
            pos += -pos % 8
            n = math.prod(shape)
            if pos + n * dtype.itemsize > len(data):
                raise CorruptCacheValue("truncated value")
            outputs[name] = np.frombuffer(data, dtype, n, pos).reshape(shape)
            pos += n * dtype.itemsize
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise CorruptCacheValue(f"unreadable cache value: {exc}") from None
    if pos != len(data) or len(outputs) != count:
        raise CorruptCacheValue("trailing bytes or repeated names")
    return outputs


class MemoryCache:
    """LRU bounded by the bytes of its keys and values, with a per-entry TTL. Sync: no awaits on a hit."""

    def __init__(self, max_bytes: int, *, clock: Clock = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._data: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()

    @property
    def entries(self) -> int:
        return len(self._data)

    def get(self, key: bytes) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._data[key]
            self.bytes -= len(key) + len(item[0])
            return None
        self._data.move_to_end(key)
        return item[0]

    def set(self, key: bytes, value: bytes, ttl_s: float) -> None:
        """Store (or replace) an entry; one larger than the whole bound is not stored."""
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= len(key) + len(old[0])
        size = len(key) + len(value)
        if size > self.max_bytes or ttl_s <= 0:
            return
        self._data[key] = (value, self._clock() + ttl_s)
        self.bytes += size
        while self.bytes > self.max_bytes:
            old_key, (old_value, _) = self._data.popitem(last=False)
            self.bytes -= len(old_key) + len(old_value)

    def clear(self) -> None:
        self._data.clear()
        self.bytes = 0


class BreakerState(enum.IntEnum):
    """Values of the ``ferry_cache_breaker_state`` gauge."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Closed → open after ``failures`` consecutive failures → one probe after ``reset_s`` (half-open) →
    closed on its success, open again on its failure. ``on_change(old, new, reason)`` sees each change."""

    def __init__(
        self,
        failures: int,
        reset_s: float,
        *,
        clock: Clock = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState, str], None] | None = None,
    ) -> None:
        self.failures, self.reset_s = failures, reset_s
        self.state = BreakerState.CLOSED
        self.on_change = on_change
        self._clock = clock
        self._count = 0
        self._opened_at = 0.0
        self._probing = False

    def rejecting(self) -> bool:
        """Whether ``allow`` would say no now (without starting a probe)."""
        if self.state is BreakerState.OPEN:
            return self._clock() - self._opened_at < self.reset_s
        return self._probing

    def allow(self) -> bool:
        """Whether a call may go ahead now; in half-open, only the one probe does."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.reset_s:
                return False
            self._move(BreakerState.HALF_OPEN, "probing")
        if self._probing:
            return False
        self._probing = True
        return True

    def success(self) -> None:
        self._count = 0
        if self.state is BreakerState.HALF_OPEN:
            self._probing = False
            self._move(BreakerState.CLOSED, "probe succeeded")

    def failure(self, reason: str = "") -> None:
        self._count += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self._count >= self.failures
        ):
            self._probing = False
            self._opened_at = self._clock()
            self._move(BreakerState.OPEN, reason)

    def abandon(self) -> None:
        """A call ended without an answer (cancelled): let the next call probe instead."""
        self._probing = False

    def _move(self, state: BreakerState, reason: str) -> None:
        old, self.state = self.state, state
        if self.on_change is not None:
            self.on_change(old, state, reason)


def redact_url(url: str) -> str:
    """``scheme://host:port/path`` without user, password or query, for logs."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


class RedisCache:
    """Redis tier. ``get``/``set`` never raise (except cancellation): an error is a miss or a no-op."""

    def __init__(
        self,
        client: aioredis.Redis,
        metrics: Metrics,
        *,
        timeout_s: float = 0.025,
        breaker_failures: int = 5,
        breaker_reset_s: float = 5.0,
        prefix: str = "ferry:v1:",
        name: str = "redis",
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self.breaker = CircuitBreaker(
            breaker_failures, breaker_reset_s, clock=clock, on_change=self._state_changed
        )
        self._client, self._timeout_s, self._prefix = client, timeout_s, prefix.encode()
        self._errors = {op: metrics.cache_errors.labels("redis", op) for op in ("get", "set")}
        self._duration = {op: metrics.cache_redis_duration.labels(op) for op in ("get", "set")}
        self._state_gauge = metrics.cache_breaker_state
        self._state_gauge.set(self.breaker.state)

    @classmethod
    def from_url(
        cls,
        url: str,
        cache: CacheSettings,
        metrics: Metrics,
        *,
        max_connections: int = 64,
        clock: Clock = time.monotonic,
    ) -> RedisCache:
        """A client on ``redis://``, ``rediss://`` or ``unix://`` (password and db in the URL), no retries."""
        timeout_s = cache.redis_timeout_ms / 1000
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=None,  # waiting for a connection is bounded by the call's timeout
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError:
            raise ConfigurationError(  # no details: they could quote the password
                "FERRY_REDIS_URL is not a Redis URL: redis://[[user]:password@]host[:port][/db], "
                "rediss://... (TLS) or unix:///path?db=N"
            ) from None
        return cls(
            aioredis.Redis.from_pool(pool),
            metrics,
            timeout_s=timeout_s,
            breaker_failures=cache.breaker_failures,
            breaker_reset_s=cache.breaker_reset_s,
            prefix=cache.key_prefix,
            name=redact_url(url),
            clock=clock,
        )

    def redis_key(self, key: bytes) -> bytes:
        return self._prefix + key.hex().encode()

    async def get(self, key: bytes) -> bytes | None:
        value = await self._call("get", self._client.get, self.redis_key(key))
        if value is None or isinstance(value, bytes):
            return value
        self._errors["get"].inc()
        return None

    async def set(self, key: bytes, value: bytes, ttl_s: float) -> None:
        await self._call("set", self._client.set, self.redis_key(key), value, px=max(1, int(ttl_s * 1000)))

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, op: str, method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if not self.breaker.allow():
            return None
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await method(*args, **kwargs)
        except ResponseError:  # Redis answered (e.g. WRONGTYPE): the server is healthy
            self._errors[op].inc()
            self.breaker.success()
            return None
        except asyncio.CancelledError:
            self.breaker.abandon()
            raise
        except Exception as exc:  # timeouts, connection errors, and anything unforeseen: fail open
            self._errors[op].inc()
            self.breaker.failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            return None
        finally:
            self._duration[op].observe(time.perf_counter() - start)
        self.breaker.success()
        return result

    def _state_changed(self, old: BreakerState, new: BreakerState, reason: str) -> None:
        self._state_gauge.set(new)
        if new is BreakerState.OPEN and old is BreakerState.CLOSED:
            log.warning(
                "Redis cache %s failing (%s); skipping it, probing every %.1f s",
                self.name,
                reason,
                self.breaker.reset_s,
            )
        elif new is BreakerState.CLOSED:
            log.warning("Redis cache %s recovered; using it again", self.name)
        else:
            log.debug("Redis cache %s breaker %s -> %s (%s)", self.name, old.name, new.name, reason)


class TieredCache:
    """Memory L1, optional Redis L2. Values are ``encode_outputs`` bytes; per-model policy from settings."""

    def __init__(
        self,
        memory: MemoryCache | None,
        redis: RedisCache | None,
        metrics: Metrics,
        *,
        settings: CacheSettings | None = None,
        max_pending_writes: int = 256,
    ) -> None:
        self.memory, self.redis = memory, redis
        self._settings = settings if settings is not None else CacheSettings()
        self._metrics = metrics
        self._lookups: dict[tuple[str, str, str], Any] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._max_pending = max_pending_writes
        self._dropped = metrics.cache_errors.labels("redis", "set")
        self._corrupt = metrics.cache_errors.labels("redis", "get")

    def enabled(self, model: str) -> bool:
        """Whether ``model``'s predictions are cached (its override, else the global switch)."""
        override = self._settings.models.get(model)
        if override is not None and override.enabled is not None:
            return override.enabled
        return self._settings.enabled

    def ttl_s(self, model: str) -> float:
        override = self._settings.models.get(model)
        if override is not None and override.ttl_s is not None:
            return override.ttl_s
        return self._settings.ttl_s

    @property
    def pending_writes(self) -> int:
        return len(self._pending)

    async def get(self, model: str, key: bytes) -> tuple[bytes | None, str]:
        """The value and the tier that had it (``memory``, ``redis``), or ``(None, "")``."""
        if self.memory is not None:
            value = self.memory.get(key)
            if value is not None:
                self._count(model, "memory", "hit")
                return value, "memory"
            self._count(model, "memory", "miss")
        if self.redis is None:
            return None, ""
        value = await self.redis.get(key)
        if value is not None:
            try:
                decode_outputs(value)
            except CorruptCacheValue:
                self._corrupt.inc()  # a miss; the caller's ``set`` overwrites it
                value = None
        if value is None:
            self._count(model, "redis", "miss")
            return None, ""
        self._count(model, "redis", "hit")
        if self.memory is not None:
            self.memory.set(key, value, self.ttl_s(model))
        return value, "redis"

    async def set(self, model: str, key: bytes, value: bytes, ttl_s: float) -> None:
        """Store in memory now and in Redis in the background (dropped, and counted, when too many wait)."""
        if self.memory is not None:
            self.memory.set(key, value, ttl_s)
        if self.redis is None or self.redis.breaker.rejecting():
            return
        if len(self._pending) >= self._max_pending:
            self._dropped.inc()
            return
        task = asyncio.get_running_loop().create_task(self.redis.set(key, value, ttl_s))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait for the background Redis writes started so far (each is bounded by the Redis timeout)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        if self.redis is not None:
            await self.redis.close()
            self.redis = None

    def _count(self, model: str, tier: str, result: str) -> None:
        child = self._lookups.get((model, tier, result))
        if child is None:
            child = self._lookups[model, tier, result] = self._metrics.cache_lookups.labels(
                model, tier, result
            )
        child.inc()


class SingleFlight:
    """Identical keys in flight share one call of ``fn``. The call runs in its own task: a waiter's
    cancellation leaves it running for the others (the last waiter leaving cancels it); every waiter
    gets its result or its exception. ``fn`` receives a probe that is true once every waiter's own
    ``gone`` probe is (``None`` when the first waiter brought none): one client hanging up never drops
    work another client waits for."""

    def __init__(self, metrics: Metrics | None = None, model: str = "") -> None:
        self._flights: dict[bytes, _Flight] = {}
        self._coalesced = metrics.cache_coalesced.labels(model) if metrics is not None else None

    def __len__(self) -> int:
        return len(self._flights)

    async def run(
        self,
        key: bytes,
        fn: Callable[[Callable[[], bool] | None], Awaitable[T]],
        gone: Callable[[], bool] | None = None,
    ) -> T:
        flight = self._flights.get(key)
        if flight is None:
            probes = [gone]
            all_gone = None if gone is None else functools.partial(_all_true, probes)
            future: asyncio.Future[Any] = asyncio.ensure_future(fn(all_gone))
            flight = self._flights[key] = (future, [0], probes)
            future.add_done_callback(functools.partial(self._finish, key, flight))
        else:
            flight[2].append(gone)
            if self._coalesced is not None:
                self._coalesced.inc()
        future, waiters, _ = flight
        waiters[0] += 1
        try:
            result: T = await asyncio.shield(future)
            return result
        except asyncio.CancelledError:
            if waiters[0] == 1:  # nobody else waits for it
                future.cancel()
                self._finish(key, flight)
            raise
        finally:
            waiters[0] -= 1

    def _finish(self, key: bytes, flight: _Flight, *_: object) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]


_Flight = tuple[asyncio.Future[Any], list[int], list[Callable[[], bool] | None]]
"""A call in flight: its future, how many wait for it, and their ``gone`` probes."""


def _all_true(probes: list[Callable[[], bool] | None]) -> bool:
    return all(probe is not None and probe() for probe in probes)


def build_cache(settings: Settings, metrics: Metrics) -> TieredCache:
    """The configured tiers; none when no model caches. The Redis client connects on first use."""
    cache = settings.cache
    wanted = cache.enabled or any(m.enabled for m in cache.models.values())
    memory = MemoryCache(cache.memory_bytes) if wanted and cache.memory_bytes > 0 else None
    redis = None
    if wanted and settings.redis_url is not None:
        redis = RedisCache.from_url(settings.redis_url.get_secret_value(), cache, metrics)
    if memory is not None:
        metrics.cache_memory_bytes.set_function(lambda: memory.bytes)
        metrics.cache_memory_entries.set_function(lambda: memory.entries)
    log.info(
        "prediction cache: memory %s, redis %s",
        f"{cache.memory_bytes} bytes" if memory is not None else "off",
        redis.name if redis is not None else "off",
    )
    return TieredCache(memory, redis, metrics, settings=cache)
