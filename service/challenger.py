"""Challenger traffic: which side of a canary answers a request, and shadow comparisons.

A model served from ``models:/NAME@ALIAS`` may have a second alias in its registry
(``FERRY_CHALLENGER__ALIAS``, default ``challenger``); ``lifecycle.ModelSet`` loads that version beside
the champion and follows it, and ``pipeline.Pipeline`` asks this module what to do with it:

- canary (``FERRY_CHALLENGER__MODE=canary``): ``to_challenger`` picks the answering side. With the key
  header (``FERRY_CHALLENGER__KEY_HEADER``) the choice is a hash of the key, so one key always lands on
  the same side and raising the share only moves keys from the champion to the challenger; without it,
  a random draw.
- shadow (``FERRY_CHALLENGER__MODE=shadow``): ``Shadow.offer`` runs a sampled share of the requests on
  the challenger after the champion answered, in a task of its own that no client waits for, and counts
  how often the two agree (``compare``). It is bounded: work is dropped, never queued, when the
  challenger's queue already holds a full batch or too many shadow calls run, and whatever the
  challenger does (raise, hang until its deadline, answer another shape) is counted and goes no further.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from service.batcher import Batcher
from service.config import ChallengerSettings
from service.metrics import Metrics
from service.registry import LoadedModel

log = logging.getLogger(__name__)

_ALIASED = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_SCALE = float(2**64)


def challenger_uri(uri: str, alias: str) -> str | None:
    """The challenger's location beside a model served from ``uri``: the same registered model under
    ``alias``; ``None`` for any other kind of location (a fixed version, a run, a directory), or when
    ``uri`` already names ``alias``."""
    match = _ALIASED.match(uri)
    if match is None or match["alias"] == alias:
        return None
    return f"models:/{match['name']}@{alias}"


def key_point(key: str) -> float:
    """Where ``key`` falls in [0, 1): the first 8 bytes of its BLAKE2b hash, the same in every process
    and on every replica (unlike Python's ``hash``, which is salted per process)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8, person=b"ferry-canary")
    return int.from_bytes(digest.digest(), "big") / _SCALE


def to_challenger(key: str | None, share: float, draw: Callable[[], float] = random.random) -> bool:
    """Whether the challenger answers a request with ``key`` (``None``: no key header, a random draw);
    ``share`` 0 never, 1 always."""
    point = key_point(key) if key else draw()
    return point < share


class Shadowed(Protocol):
    """What a shadow call needs of a request (``pipeline.Call``): its decoding against a version."""

    @property
    def decode(self) -> Callable[[LoadedModel], Any]: ...


class Version(Protocol):
    """What a shadow call needs of the challenger (``lifecycle.ActiveVersion``)."""

    @property
    def model(self) -> LoadedModel: ...

    @property
    def batcher(self) -> Batcher: ...

    @property
    def version(self) -> str: ...


class Comparison:
    """Rows of one shadowed request: compared, agreeing, and each numeric row's largest difference."""

    __slots__ = ("agreed", "differences", "rows")

    def __init__(self, rows: int, agreed: int, differences: np.ndarray | None) -> None:
        self.rows, self.agreed, self.differences = rows, agreed, differences


def compare(
    champion: Mapping[str, np.ndarray], challenger: Mapping[str, np.ndarray], tolerance: float
) -> Comparison:
    """The first output of each, row by row: a classifier (a 2-D float output with several columns)
    agrees on a row when its argmax is the same; other numbers when every value of the row is within
    ``tolerance``; anything else (strings) when the values are equal. ``ValueError`` when the two
    outputs cannot be compared (another shape, numbers against strings)."""
    first = next(iter(champion.values()), None)
    other = next(iter(challenger.values()), None)
    if first is None or other is None:
        raise ValueError("an output is missing")
    a, b = np.asarray(first), np.asarray(other)
    if a.shape != b.shape:
        raise ValueError(f"the challenger's output has shape {list(b.shape)}, the champion's {list(a.shape)}")
    if a.ndim == 0:
        a, b = a.reshape(1), b.reshape(1)
    rows = a.shape[0]
    numeric = a.dtype.kind in "fiub" and b.dtype.kind in "fiub"
    if not numeric:
        if (a.dtype.kind in "fiub") != (b.dtype.kind in "fiub"):
            raise ValueError(f"the challenger's output is {b.dtype}, the champion's {a.dtype}")
        equal = (a.reshape(rows, -1) == b.reshape(rows, -1)).all(axis=1)
        return Comparison(rows, int(equal.sum()), None)
    fa, fb = a.reshape(rows, -1).astype(np.float64), b.reshape(rows, -1).astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.abs(fa - fb)
    diff = np.where(np.isnan(diff) & (np.isnan(fa) == np.isnan(fb)), 0.0, diff)  # NaN on both sides agrees
    diff = np.where(np.isnan(diff), np.inf, diff)
    worst = diff.max(axis=1) if diff.shape[1] else np.zeros(rows)
    if a.ndim == 2 and a.shape[1] > 1 and a.dtype.kind == "f":
        agreed = int((fa.argmax(axis=1) == fb.argmax(axis=1)).sum())
    else:
        agreed = int((worst <= tolerance).sum())
    return Comparison(rows, agreed, worst)


class Shadow:
    """Runs sampled requests on the challenger after their answer, bounded, and records the comparison."""

    def __init__(
        self,
        settings: ChallengerSettings,
        metrics: Metrics,
        timeout_s: float,
        max_rows: int,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._settings, self._metrics = settings, metrics
        self._timeout_s, self._max_rows = timeout_s, max_rows
        self._draw = draw
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def offer(self, call: Shadowed, challenger: Version, outputs: Mapping[str, np.ndarray]) -> bool:
        """Maybe shadow ``call`` (answered with ``outputs``) on ``challenger``; returns whether a shadow
        call started. Never blocks, never raises."""
        if self._draw() >= self._settings.share:
            return False
        name = challenger.model.name
        if len(self._tasks) >= self._settings.shadow_in_flight:
            self._metrics.challenger_dropped.labels(name, "in_flight").inc()
            return False
        if challenger.batcher.closing or challenger.batcher.queued_rows >= self._max_rows:
            self._metrics.challenger_dropped.labels(name, "busy").inc()
            return False
        task = asyncio.get_running_loop().create_task(
            self._run(call, challenger, outputs), name=f"shadow-{name}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, call: Shadowed, challenger: Version, outputs: Mapping[str, np.ndarray]) -> None:
        name = challenger.model.name
        m = self._metrics
        try:
            decoded = call.decode(challenger.model)
            result = await challenger.batcher.submit(
                decoded.arrays, decoded.rows, self._timeout_s, decoded.params, None
            )
            comparison = await asyncio.to_thread(compare, outputs, result.outputs, self._settings.tolerance)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever the challenger does stays here
            m.challenger_dropped.labels(name, "failed").inc()
            log.debug("model %s challenger v%s: shadow call failed: %r", name, challenger.version, exc)
            return
        m.challenger_compared.labels(name).inc(comparison.rows)
        m.challenger_agreed.labels(name).inc(comparison.agreed)
        if comparison.differences is not None:
            histogram = m.challenger_difference.labels(name)
            for value in comparison.differences[:256].tolist():
                histogram.observe(value)

    async def close(self) -> None:
        """Cancel the shadow calls still running (shutdown: nobody waits for them)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
