"""``SingleFlight``: identical requests in flight at once run the model once."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from service.metrics import Metrics

T = TypeVar("T")


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
