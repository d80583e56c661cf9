"""The prediction cache: one package for every tier.

- Keys (``keys.py``): a BLAKE2b hash of model name, resolved version, every input's name, dtype, shape
  and bytes, and the params, so a new version never sees an old version's entries.
- Values (``codec.py``): a small header plus raw array bytes, never pickle; anything else read back is
  ``CorruptCacheValue`` and counts as a miss.
- Memory tier (``lru.py``, ``tiered.py``): ``ByteLRU``, bounded in bytes (``FERRY_CACHE__MEMORY_BYTES``),
  counting each entry's own cost too, with a TTL per entry; holds decoded, read-only outputs. The
  response tier (``service/api/replay.py``, whole rendered answers) is another ``ByteLRU``.
- Redis tier (``redis.py``, ``breaker.py``): optional, shared by replicas, fails open: each call is
  bounded by a timeout, a circuit breaker skips Redis for a while after repeated failures, and no Redis
  error ever reaches a request. ``redis.py`` is the only importer of ``redis``.
- ``TieredCache`` (``tiered.py``): memory then Redis; a Redis hit is decoded once and fills memory.
- ``SingleFlight`` (``flight.py``): identical requests in flight at once run the model once.

Everything here runs on the event loop's thread (not thread-safe).
"""

from service.cache.breaker import BreakerState, CircuitBreaker
from service.cache.codec import CorruptCacheValue, Outputs, decode_outputs, encode_outputs, held_bytes
from service.cache.flight import SingleFlight
from service.cache.keys import cache_key
from service.cache.lru import ENTRY_BYTES, ByteLRU
from service.cache.redis import RedisCache, redact_url
from service.cache.tiered import MemoryTier, TieredCache, build_cache, memory_tier

__all__ = [
    "ENTRY_BYTES",
    "BreakerState",
    "ByteLRU",
    "CircuitBreaker",
    "CorruptCacheValue",
    "MemoryTier",
    "Outputs",
    "RedisCache",
    "SingleFlight",
    "TieredCache",
    "build_cache",
    "cache_key",
    "decode_outputs",
    "encode_outputs",
    "held_bytes",
    "memory_tier",
    "redact_url",
]
