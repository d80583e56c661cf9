"""The one request pipeline every protocol calls: ``Pipeline.infer(call) -> answer``.

A protocol's codec (``api/protocols/``) turns a request into a ``Call`` and an ``Answer`` into a
response; everything between is here, once: the version that answers (the champion, or in a canary
the challenger: ``challenger.py``), decoding against that version's signature (an ``InvalidInput``
there is counted), the row limit, one cache lookup, single-flight of identical requests, the batcher,
one cache write, the model's metrics, and in shadow mode the challenger's run after the answer.
Request data travels in the ``Call`` and the ``Answer``, never in context variables, so any entry
point (HTTP, gRPC, a batch job) gets the same behaviour by building a ``Call``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.batcher import Probe
from service.cache import TieredCache, cache_key
from service.challenger import Shadow, to_challenger
from service.config import Settings
from service.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
)
from service.lifecycle import ActiveVersion, ModelSet
from service.metrics import ModelMetrics
from service.registry import LoadedModel
from service.runtime.base import TENSORS, OutputForm


@dataclass(frozen=True, slots=True)
class Decoded:
    """A request's inputs, checked against the signature of the version that will answer it."""

    arrays: dict[str, np.ndarray]
    rows: int
    params: Mapping[str, Any] | None = None
    extra: Any = None
    """What the codec keeps from decoding for encoding the answer (v2: output selection, request id)."""


@dataclass(frozen=True, slots=True)
class Call:
    """One inference request, as every protocol states it.

    ``decode`` is the codec's decoding of the request's inputs against a model version's signature: the
    pipeline calls it with the version it resolved, so inputs are always checked against the version
    that computes them, even while a swap happens."""

    model: str | None
    """The served model's name; ``None``: the default model."""
    protocol: str
    """``ferry``, ``v2`` or ``mlflow``: the label of the answered-requests metrics."""
    decode: Callable[[LoadedModel], Decoded]
    version: str | None = None
    """A version the request insists on (v2's ``/versions/{v}/``): 404 unless it is the one loaded."""
    cache: str | None = None
    """Cache policy: ``None``, ``no-cache`` (skip the lookup, store the answer) or ``no-store`` (neither)."""
    gone: Probe | None = None
    """Turns true once the client has hung up (``None``: cannot tell): its queued rows are dropped."""
    deadline: float | None = None
    """The client's own deadline, in ``time.monotonic()`` seconds (gRPC's); ``None``: it set none. The
    request waits for its rows until the earlier of it and ``FERRY_BATCH__TIMEOUT_MS``."""
    key: str | None = None
    """The request key (``FERRY_CHALLENGER__KEY_HEADER``): in a canary, the same key always gets the same
    version; ``None``: none was sent."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What a protocol needs to answer one call."""

    model: str
    version: str
    flavor: str
    outputs: dict[str, np.ndarray]
    cache: str
    """``hit`` or ``miss``."""
    rows: int
    protocol: str
    replay_ttl_s: float | None
    """Seconds the rendered answer may be replayed (the response tier); ``None``: not at all (caching
    off for the model, or the request asked for no caching)."""
    metrics: ModelMetrics
    extra: Any = None
    form: OutputForm = TENSORS
    """What kind of value the model returned (a pyfunc model's DataFrame, Series, dict...), for the
    protocols that render each kind their own way (MLflow's records)."""


class Pipeline:
    """Answers calls with the versions ``models`` serves, through the cache and each version's batcher."""

    def __init__(self, settings: Settings, models: ModelSet, cache: TieredCache | None = None) -> None:
        self.models = models
        self._cache = cache
        self._timeout_s = settings.batch.timeout_ms / 1000
        self._max_rows = settings.limits.max_rows
        self._challenger = settings.challenger
        self.key_header = settings.challenger.key_header
        """The request header a codec reads into ``Call.key``."""
        self.key_header_name = self.key_header.lower().encode("latin-1")
        """``key_header`` as an HTTP/ASGI header name (lower-case bytes)."""
        self._shadow = (
            Shadow(settings.challenger, models.metrics, self._timeout_s, settings.batch.max_rows)
            if settings.challenger.mode == "shadow"
            else None
        )

    async def infer(self, call: Call) -> Answer:
        """Decode, then answer from the cache or the batcher; the answer names the version.

        The cache works per request: the key covers every row, so a repeat of the same request is a
        hit. Identical requests in flight at once run the model once."""
        started = time.perf_counter()
        # In use until answered: the memory budget never evicts it meanwhile (and loads it if it did).
        async with self.models.serving(call.model, self._timeout_s) as active:
            challenger = None
            if self._challenger.mode != "off":
                challenger = self.models.challenger(active.model.name)
            chosen, split = active, challenger is not None and self._shadow is None
            if challenger is not None and (
                challenger.version == call.version
                if call.version is not None
                else self._shadow is None and to_challenger(call.key, self._challenger.share)
            ):
                chosen = challenger
            try:
                answer = await self._answer(call, chosen, started, split)
            except NotReady:
                # A swap retired the version chosen above before the request reached its queue (its
                # batcher refuses new rows while it drains): the version that replaced it answers (the
                # champion, when it was a challenger that went).
                if not chosen.batcher.closing:
                    raise
                newer = active if chosen is not active else self.models.active(call.model)
                if newer is chosen or newer.batcher.closing:
                    raise
                answer = await self._answer(call, newer, started, split)
            if self._shadow is not None and challenger is not None and answer.version != challenger.version:
                self._shadow.offer(call, challenger, answer.outputs)  # after the answer; never waited for
            return answer

    async def _answer(self, call: Call, active: ActiveVersion, started: float, split: bool = False) -> Answer:
        """``active``'s answer to ``call``; with ``split`` (a canary: a challenger beside the model) the
        answer is not replayed by the response tier, which is keyed on the request alone, so every
        request reaches the choice of version. (In shadow mode a replayed repeat is not shadowed.)"""
        if call.version is not None and call.version != active.version:
            name, loaded = active.model.name, active.version
            raise ModelNotFound(
                f"model {name!r} version {call.version!r} is not loaded; loaded version(s): [{loaded!r}]",
                model=name,
                loaded=[loaded],
            )
        model = active.model
        try:
            decoded = call.decode(model)
        except InvalidInput:
            active.metrics.invalid.inc()
            raise
        rows, params = decoded.rows, decoded.params
        if rows > self._max_rows:
            raise PayloadTooLarge(
                f"{rows} rows in one request; the limit is {self._max_rows} (FERRY_LIMITS__MAX_ROWS)",
                rows=rows,
            )
        cache, name, version = self._cache, model.name, model.ref.version
        key = None
        if cache is not None and call.cache != "no-store" and cache.enabled(name):
            try:
                # The source (registered model and version, run, or content digest), not the version
                # string: a name re-pointed to another model with the same version number must miss.
                key = cache_key(name, model.ref.source, decoded.arrays, params)
            except TypeError:  # inputs the cache cannot key (objects other than str, bytes, None)
                key = None
        tier = "miss"
        outputs: dict[str, np.ndarray] | None = None
        if key is not None and cache is not None and call.cache != "no-cache":
            outputs, _tier = await cache.get(name, key)
            if outputs is not None:
                tier = "hit"
        if outputs is None:
            outputs = await self._compute(active, decoded, key, call.gone, call.deadline)
        active.metrics.observe_total(time.perf_counter() - started)
        active.metrics.answered(call.protocol, rows)
        ttl = cache.ttl_s(name) if key is not None and cache is not None and call.cache is None else None
        if split:
            ttl = None
        return Answer(
            name,
            version,
            model.flavor,
            outputs,
            tier,
            rows,
            call.protocol,
            ttl,
            active.metrics,
            decoded.extra,
            getattr(model.runtime, "output_form", TENSORS),
        )

    async def _compute(
        self,
        active: ActiveVersion,
        decoded: Decoded,
        key: bytes | None,
        gone: Probe | None,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray]:
        """The model's outputs through the batcher; with a cache key, once for identical calls in flight
        and stored."""
        if key is None:
            return await self._run(active, decoded, gone, deadline)
        computed: dict[str, np.ndarray] = await active.flights.run(
            key, lambda all_gone: self._run(active, decoded, all_gone, deadline), gone
        )
        cache = self._cache
        assert cache is not None
        name = active.model.name
        with contextlib.suppress(TypeError):  # outputs the cache cannot hold (objects other than strings)
            await cache.set(name, key, computed, cache.ttl_s(name))
        return computed

    async def _run(
        self, active: ActiveVersion, decoded: Decoded, gone: Probe | None, deadline: float | None = None
    ) -> dict[str, np.ndarray]:
        m = active.metrics
        timeout_s = self._timeout_s
        if deadline is not None:
            timeout_s = max(0.0, min(timeout_s, deadline - time.monotonic()))
        try:
            result = await active.batcher.submit(
                decoded.arrays, decoded.rows, timeout_s, decoded.params, gone
            )
        except Overloaded:
            m.overload.inc()
            raise
        except DeadlineExceeded:
            m.timeout.inc()
            raise
        m.observe_queue(result.queue_s)
        m.observe_compute(result.compute_s)
        return result.outputs

    async def close(self) -> None:
        """Cancel the shadow calls, flush and close the cache (the models close on their own)."""
        if self._shadow is not None:
            await self._shadow.close()
        if self._cache is not None:
            await self._cache.close()
