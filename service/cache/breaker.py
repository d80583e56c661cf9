"""``CircuitBreaker``: how the Redis tier stops calling a Redis that keeps failing, and tries it again."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from service.cache.lru import Clock


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
