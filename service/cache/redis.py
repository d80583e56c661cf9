"""The Redis tier: plain bytes under ``prefix + hex(key)``, each call bounded by a timeout, skipped by a
``CircuitBreaker`` after repeated failures. It fails open: no Redis error ever reaches a request (a get
that fails is a miss, a set that fails is a no-op). The only importer of ``redis`` in the project.

With a secret (``FERRY_CACHE__REDIS_SECRET`` or ``_FILE``) every value written carries a MAC bound to
its key (``codec.ValueSealer``) and a value read back whose MAC does not verify is a miss, counted in
``ferry_cache_unauthenticated_total`` and logged at most once a minute. Without one, whoever can write
to Redis can plant answers every replica serves; start-up says so. A secret made up per process would
make every replica (and every restart) miss the others' values, which is the Redis tier's whole point,
so the default is to authenticate only with a configured secret, and to warn.
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
from service.cache.codec import ForgedCacheValue, ValueSealer
from service.cache.lru import Clock
from service.config import CacheSettings
from service.errors import ConfigurationError
from service.metrics import Metrics

log = logging.getLogger("service.cache")  # the package's one logger: its lines keep their name

REFUSED_WARNING_EVERY_S = 60.0
"""At most one warning about refused (unauthenticated) values per this many seconds."""


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
        sealer: ValueSealer | None = None,
    ) -> None:
        self.name = name
        self.breaker = CircuitBreaker(
            breaker_failures, breaker_reset_s, clock=clock, on_change=self._state_changed
        )
        self._sealer, self._clock = sealer, clock
        self._unauthenticated = metrics.cache_unauthenticated
        self._refused_unlogged, self._next_refused_warning = 0, float("-inf")
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
        """A client on ``redis://``, ``rediss://`` or ``unix://`` (password and db in the URL), no retries;
        its values authenticated with the configured secret, if any."""
        timeout_s = cache.redis_timeout_ms / 1000
        secret = read_secret(cache)
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
        name = redact_url(url)
        if secret is None:
            log.warning(
                "Redis cache %s: values are not authenticated, so whoever can write to this Redis can plant "
                "answers that every replica serves; set FERRY_CACHE__REDIS_SECRET_FILE (or "
                "FERRY_CACHE__REDIS_SECRET) to one random secret shared by the replicas",
                name,
            )
        return cls(
            aioredis.Redis.from_pool(pool),
            metrics,
            timeout_s=timeout_s,
            breaker_failures=cache.breaker_failures,
            breaker_reset_s=cache.breaker_reset_s,
            prefix=cache.key_prefix,
            name=name,
            clock=clock,
            sealer=ValueSealer(secret) if secret is not None else None,
        )

    @property
    def authenticated(self) -> bool:
        """Whether values carry (and must carry) a MAC."""
        return self._sealer is not None

    def redis_key(self, key: bytes) -> bytes:
        return self._prefix + key.hex().encode()

    async def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, its MAC checked and removed; ``None``: a miss."""
        redis_key = self.redis_key(key)
        value = await self._call("get", self._client.get, redis_key)
        if value is None:
            return None
        if not isinstance(value, bytes):
            self._errors["get"].inc()
            return None
        if self._sealer is None:
            return value
        try:
            return self._sealer.open(redis_key, value)
        except ForgedCacheValue as exc:
            self._refused(str(exc))
            return None

    async def set(self, key: bytes, value: bytes, ttl_s: float) -> None:
        redis_key = self.redis_key(key)
        if self._sealer is not None:
            value = self._sealer.seal(redis_key, value)
        await self._call("set", self._client.set, redis_key, value, px=max(1, int(ttl_s * 1000)))

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

    def _refused(self, reason: str) -> None:
        """Count a value that failed authentication; warn at once, then at most once a minute."""
        self._unauthenticated.inc()
        self._refused_unlogged += 1
        now = self._clock()
        if now < self._next_refused_warning:
            return
        log.warning(
            "Redis cache %s: refused %d value(s) since the last warning (latest: %s): planted, or written "
            "under another FERRY_CACHE__REDIS_SECRET or without one; each was a miss "
            "(ferry_cache_unauthenticated_total counts them)",
            self.name,
            self._refused_unlogged,
            reason,
        )
        self._refused_unlogged = 0
        self._next_refused_warning = now + REFUSED_WARNING_EVERY_S

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


def read_secret(cache: CacheSettings) -> bytes | None:
    """The MAC secret of Redis values, from ``redis_secret`` or the file ``redis_secret_file`` (one
    trailing newline dropped); ``None`` when neither is set. ``ConfigurationError`` (never quoting the
    secret) when the file cannot be read or holds too short a secret."""
    if cache.redis_secret is not None:
        return cache.redis_secret.get_secret_value().encode()
    if cache.redis_secret_file is None:
        return None
    path = cache.redis_secret_file
    try:
        with open(path, "rb") as file:
            secret = file.read()
    except OSError as exc:
        raise ConfigurationError(
            f"FERRY_CACHE__REDIS_SECRET_FILE {path}: cannot read it ({exc.strerror or exc})"
        ) from None
    secret = secret.removesuffix(b"\n").removesuffix(b"\r")
    if len(secret) < ValueSealer.MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"FERRY_CACHE__REDIS_SECRET_FILE {path}: the secret must be at least "
            f"{ValueSealer.MIN_SECRET_BYTES} bytes (e.g. openssl rand -hex 32)"
        )
    return secret
