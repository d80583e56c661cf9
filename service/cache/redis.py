"""The Redis tier: plain bytes under ``prefix + hex(key)``, each call bounded by a timeout, skipped by a
``CircuitBreaker`` after repeated failures. It fails open: no Redis error ever reaches a request (a get
that fails is a miss, a set that fails is a no-op). The only importer of ``redis`` in the project.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from service.cache.breaker import BreakerState, CircuitBreaker
from service.cache.lru import Clock
from service.config import CacheSettings
from service.errors import ConfigurationError
from service.metrics import Metrics

log = logging.getLogger("service.cache")  # the package's one logger: its lines keep their name


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
