"""``TieredCache``: memory L1 in front of an optional Redis L2, holding decoded outputs; ``build_cache``.

The memory tier holds each value decoded (read-only arrays on one ``encode_outputs`` buffer), so a hit
costs a dict copy, not a decode; Redis holds the encoded bytes, which a hit decodes exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from service.cache.codec import CorruptCacheValue, Outputs, decode_outputs, encode_outputs, held_bytes
from service.cache.lru import ByteLRU, Clock
from service.cache.redis import RedisCache
from service.config import CacheSettings, Settings
from service.metrics import Metrics

log = logging.getLogger("service.cache")  # the package's one logger: its lines keep their name

MemoryTier = ByteLRU[Outputs]


def memory_tier(max_bytes: int, *, clock: Clock = time.monotonic) -> MemoryTier:
    """The memory tier: decoded outputs, each counted as the buffer, arrays, names and dict it holds."""
    return ByteLRU(max_bytes, held_bytes, clock=clock)


class TieredCache:
    """Memory L1, optional Redis L2, per-model policy from settings. ``get`` answers outputs whose arrays
    are read-only (a caller cannot change what the next hit sees); ``set`` takes a model's outputs."""

    def __init__(
        self,
        memory: MemoryTier | None,
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

    async def get(self, model: str, key: bytes) -> tuple[Outputs | None, str]:
        """The outputs and the tier that had them (``memory``, ``redis``), or ``(None, "")``. A corrupt
        Redis value is a miss (counted as a Redis get error); the caller's ``set`` overwrites it."""
        if self.memory is not None:
            outputs = self.memory.get(key)
            if outputs is not None:
                self._count(model, "memory", "hit")
                return dict(outputs), "memory"  # the caller may change its dict, not the cached one
            self._count(model, "memory", "miss")
        if self.redis is None:
            return None, ""
        data = await self.redis.get(key)
        outputs = None
        if data is not None:
            try:
                outputs = decode_outputs(data)  # the one decode of this value
            except CorruptCacheValue:
                self._corrupt.inc()
        if outputs is None:
            self._count(model, "redis", "miss")
            return None, ""
        self._count(model, "redis", "hit")
        if self.memory is not None:
            self.memory.put(key, outputs, self.ttl_s(model))
        return dict(outputs), "redis"

    async def set(self, model: str, key: bytes, outputs: Outputs, ttl_s: float) -> None:
        """Store in memory now and in Redis in the background (dropped, and counted, when too many wait).

        Raises ``TypeError`` for outputs the cache cannot hold (objects other than strings). Encodes
        once; the memory tier keeps that buffer decoded: compact (not a view into the model's whole
        batch), read-only, and counted by what it holds.
        """
        data = encode_outputs(outputs)
        if self.memory is not None:
            self.memory.put(key, decode_outputs(data), ttl_s)
        if self.redis is None or self.redis.breaker.rejecting():
            return
        if len(self._pending) >= self._max_pending:
            self._dropped.inc()
            return
        task = asyncio.get_running_loop().create_task(self.redis.set(key, data, ttl_s))
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


def build_cache(settings: Settings, metrics: Metrics) -> TieredCache:
    """The configured tiers; none when no model caches. The Redis client connects on first use."""
    cache = settings.cache
    wanted = cache.enabled or any(m.enabled for m in cache.models.values())
    memory = memory_tier(cache.memory_bytes) if wanted and cache.memory_bytes > 0 else None
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
