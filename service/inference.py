"""``InferenceService`` and ``ModelSlot``: the one path every protocol's request takes below its route.

validate against the signature → cache → batcher → runtime, with metrics at each stage. A slot holds one
loaded model version with its batcher; loading builds and warms up a new slot before it replaces the old
one, so a swap is a single reference assignment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.batcher import Batcher, Probe
from service.cache import SingleFlight, TieredCache, cache_key, decode_outputs, encode_outputs
from service.config import Settings
from service.errors import (
    ConfigurationError,
    DeadlineExceeded,
    FerryError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
)
from service.metrics import Metrics, ModelMetrics
from service.registry import LoadedModel, ModelRef, ModelRegistry, ModelSpec
from service.signature import decode_inputs

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Prediction:
    """What a protocol needs to answer one request."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]
    cache: str = "miss"


@dataclass(frozen=True, slots=True)
class Answered:
    """What the last ``compute`` of this request answered, for the response cache (``api/replay.py``)."""

    model: str
    rows: int
    protocol: str
    metrics: ModelMetrics
    ttl_s: float | None
    """Seconds the answer may be replayed; ``None``: not at all (caching off for the model, or asked)."""


LAST_ANSWER: ContextVar[Answered | None] = ContextVar("ferry_last_answer", default=None)
CLIENT_GONE: ContextVar[Probe | None] = ContextVar("ferry_client_gone", default=None)
"""Set by the HTTP layer for each request: tells whether its client hung up (``None``: cannot tell).
Queued rows of a client that left are dropped before they reach the model."""


@dataclass(frozen=True, slots=True)
class ActiveVersion:
    """A loaded, warmed-up model version with the batcher in front of it; swapped in as one reference."""

    model: LoadedModel
    batcher: Batcher
    metrics: ModelMetrics
    flights: SingleFlight
    loaded_at: float
    info_labels: tuple[str, ...]

    @property
    def version(self) -> str:
        return self.model.ref.version

    async def close(self) -> None:
        """Drain the queued requests, then free the model (and its device memory)."""
        await self.batcher.close(drain=True)
        self.model.runtime.close()


@dataclass(slots=True)
class Loading:
    """The one load of a model in progress: what it loads and the task doing it."""

    uri: str
    version: str | None
    """The version it loads; ``None`` until the URI is resolved."""
    task: asyncio.Task[ModelSlot] = field(init=False)

    def joins(self, uri: str, ref: ModelRef | None) -> bool:
        """Whether a caller asking for ``uri`` (resolved to ``ref``, if it already was) gets what this
        load will give: the same URI, and no version known on either side that differs."""
        return (
            self.uri == uri and (ref is None or self.version is None or self.version == ref.version)
        ) and not self.task.done()


@dataclass(slots=True)
class ModelSlot:
    """One served model: its configuration, its state and the version that answers now."""

    spec: ModelSpec
    state: str = "loading"
    active: ActiveVersion | None = None
    error: str | None = None
    loading: Loading | None = None
    """The load in progress, if any: at most one per model at a time (see ``InferenceService.load``)."""

    @property
    def name(self) -> str:
        return self.spec.name


class InferenceService:
    """Loads the configured models and answers predictions for every protocol."""

    def __init__(
        self, settings: Settings, registry: ModelRegistry, metrics: Metrics, cache: TieredCache | None = None
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._registry = registry
        self._metrics = metrics
        specs = [ModelSpec.parse(entry) for entry in settings.models]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"model names must be unique, got {names}")
        self._slots: dict[str, ModelSlot] = {s.name: ModelSlot(s) for s in specs}
        default = settings.default_model or (names[0] if names else None)
        if default is not None and default not in self._slots:
            raise ConfigurationError(f"default model {default!r} is not among the served models {names}")
        self._default = default
        self._timeout_s = settings.batch.timeout_ms / 1000
        self._max_rows = settings.limits.max_rows
        self.shutting_down = False
        self.generation = 0
        """Bumped whenever the set of answering versions changes (swap, add, remove): replayed responses
        are keyed on it, so none outlives the version that computed it."""

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every configured model at once; a broken one is reported, not fatal (bad settings are).
        MLflow's loaders that are not thread-safe are serialized in the registry, downloads are not."""
        results = await asyncio.gather(
            *(self.load(slot.name) for slot in self._slots.values()), return_exceptions=True
        )
        for slot, result in zip(self._slots.values(), results, strict=True):
            if isinstance(result, ConfigurationError):
                raise result
            if isinstance(result, FerryError):
                log.error("model %s not loaded: %s", slot.name, result.message)
            elif isinstance(result, BaseException):  # cancelled: the server is stopping
                raise result

    def loading(self, name: str) -> bool:
        """Whether a load of ``name`` is in progress (the reloader then skips its poll)."""
        slot = self._slots.get(name)
        return slot is not None and slot.loading is not None and not slot.loading.task.done()

    async def load(self, name: str, uri: str | None = None, ref: ModelRef | None = None) -> ModelSlot:
        """Resolve (unless ``ref`` is given), download, load and warm up a version of ``name``, then swap
        it in with one reference assignment and drain the old version. A version that fails any step
        is never swapped in: the old one keeps serving.

        Every load of a model goes through here (start-up, the reloader, the admin API), and at most
        one runs per model: a caller asking for what the load in progress will give joins it; any other
        load waits for it to finish. MLflow's loaders keep process-wide state, so two loads of one
        version at once fail or load it twice. A caller that is cancelled leaves the load running."""
        slot = self._slots[name]
        uri = uri or slot.spec.uri
        pending = slot.loading
        if pending is not None and pending.joins(uri, ref):
            return await asyncio.shield(pending.task)
        before = pending.task if pending is not None and not pending.task.done() else None
        loading = Loading(uri, ref.version if ref is not None else None)
        loading.task = asyncio.create_task(self._load_after(before, slot, loading, ref), name=f"load-{name}")
        slot.loading = loading
        loading.task.add_done_callback(lambda _: _clear(slot, loading))
        return await asyncio.shield(loading.task)

    async def _load_after(
        self, before: asyncio.Task[ModelSlot] | None, slot: ModelSlot, loading: Loading, ref: ModelRef | None
    ) -> ModelSlot:
        if before is not None:
            with contextlib.suppress(Exception):
                await before
        return await self._load(slot, loading, ref)

    async def _load(self, slot: ModelSlot, loading: Loading, ref: ModelRef | None) -> ModelSlot:
        name = slot.name
        spec = ModelSpec(name, loading.uri)
        started = time.perf_counter()
        stage = "resolve"
        try:
            if ref is None:
                ref = await asyncio.to_thread(self._registry.resolve, spec.uri)
                loading.version = ref.version
            stage = "load"
            model = await asyncio.to_thread(self._registry.load, name, ref)
            stage = "warmup"
            batcher, slot_metrics = self._batcher(name, model)
            try:
                await self._warm_up(name, model, batcher)
            except BaseException:
                await batcher.close(drain=False)
                model.runtime.close()
                raise
        except Exception as exc:
            failure = _load_failure(name, stage, exc)
            self._metrics.load_failures.labels(name, stage).inc()
            if slot.active is None:
                slot.state, slot.error = "failed", failure.message
                self._metrics.model_ready.labels(name).set(0)
            if failure is exc:
                raise
            raise failure from exc
        info = model.runtime.info
        labels = (
            name,
            ref.version,
            ref.alias or "",
            model.flavor,
            info.runtime,
            info.device,
            ",".join(info.providers),
        )
        new = ActiveVersion(
            model, batcher, slot_metrics, SingleFlight(self._metrics, name), time.time(), labels
        )
        old, slot.spec, slot.active = slot.active, spec, new
        self.generation += 1
        slot.state, slot.error = "ready", None
        self._metrics.load_duration.labels(name).observe(time.perf_counter() - started)
        self._metrics.model_ready.labels(name).set(1)
        self._metrics.model_info.labels(*labels).set(1)
        log.info(
            "model %s v%s ready (%s on %s) in %.2fs",
            name, ref.version, model.flavor, info.device, time.perf_counter() - started,
        )  # fmt: skip
        if old is not None:
            await self._retire(old)
        return slot

    async def add(self, name: str, uri: str) -> ModelSlot:
        """Serve a new model, or an existing one from a new URI (admin API)."""
        try:
            spec = ModelSpec.parse(f"{name}={uri}")
        except ConfigurationError as exc:
            raise InvalidInput(exc.message, field="uri") from None
        if spec.name in self._slots:
            return await self.load(spec.name, spec.uri)
        self._slots[spec.name] = ModelSlot(spec)
        if self._default is None:
            self._default = spec.name
        return await self.load(spec.name)

    async def remove(self, name: str) -> None:
        """Stop serving ``name``: new requests get 404, queued ones finish, then the model is freed."""
        slot = self.find(name)
        del self._slots[name]
        if slot.loading is not None:
            slot.loading.task.cancel()
        self.generation += 1
        if self._default == name:
            self._default = next(iter(self._slots), None)
        with contextlib.suppress(KeyError):
            self._metrics.model_ready.remove(name)
        if slot.active is not None:
            await self._retire(slot.active)

    async def _retire(self, old: ActiveVersion) -> None:
        """Drain an old version's queued requests, free it, and drop its per-version gauges."""
        await old.close()
        name, version = old.model.name, old.version
        with contextlib.suppress(KeyError):
            self._metrics.model_info.remove(*old.info_labels)
        for gauge in (self._metrics.queue_rows, self._metrics.queue_capacity_rows):
            with contextlib.suppress(KeyError):
                gauge.remove(name, version)

    async def close(self) -> None:
        self.shutting_down = True
        loads = [s.loading.task for s in self._slots.values() if s.loading is not None]
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        if self._cache is not None:
            await self._cache.close()
        for slot in self._slots.values():
            if slot.active is not None:
                await slot.active.close()
            slot.state = "stopped"

    def _batcher(self, name: str, model: LoadedModel) -> tuple[Batcher, ModelMetrics]:
        batch = self._settings.batch
        first = model.outputs[0] if model.outputs else None
        classes = (
            first.shape[-1] if first is not None and len(first.shape) == 2 and first.shape[-1] > 1 else 0
        )
        slot_metrics = ModelMetrics(self._metrics, name, model.ref.version, classes)
        self._metrics.queue_capacity_rows.labels(name, model.ref.version).set(batch.queue_rows)
        runtime = model.runtime

        def run(inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
            outputs = runtime.predict_batch(inputs, params)
            slot_metrics.outputs(outputs)
            return outputs

        batcher = Batcher(
            run,
            max_rows=batch.max_rows,
            queue_rows=batch.queue_rows,
            max_wait_s=batch.max_wait_ms / 1000,
            enabled=batch.enabled,
            observer=slot_metrics,
            name=name,
        )
        return batcher, slot_metrics

    async def _warm_up(self, name: str, model: LoadedModel, batcher: Batcher) -> None:
        """Run the logged input example (or zeros of the signature's shape) and check the outputs."""
        if not self._settings.warmup:
            return
        example = model.input_example or {
            s.name: np.zeros(tuple(1 if d < 0 else d for d in s.shape), dtype=s.dtype) for s in model.inputs
        }
        try:
            example = {s.name: np.ascontiguousarray(example[s.name], dtype=s.dtype) for s in model.inputs}
            rows = int(next(iter(example.values())).shape[0])
            result = await batcher.submit(example, rows, max(self._timeout_s, 60.0))
        except FerryError as exc:
            raise ModelLoadError(f"model {name} v{model.ref.version} failed warm-up: {exc.message}") from exc
        except Exception as exc:
            raise ModelLoadError(f"model {name} v{model.ref.version} failed warm-up: {exc!r}") from exc
        where = f"model {name} v{model.ref.version}: warm-up output"
        for i, out in enumerate(result.outputs.values()):
            if out.dtype.kind == "f" and not np.isfinite(out).all():
                raise ModelLoadError(f"{where} has NaN or inf")
            want = model.outputs[i].shape if i < len(model.outputs) else None
            if want is not None and (
                out.ndim != len(want)
                or any(w >= 0 and g != w for w, g in zip(want[1:], out.shape[1:], strict=False))
            ):
                raise ModelLoadError(f"{where} has shape {list(out.shape)}, the signature says {list(want)}")

    # -- queries -----------------------------------------------------------------------------------
    def active(self, name: str | None) -> ActiveVersion:
        """The version answering ``name`` (``None``: the default model); 404 if unknown, 503 if not ready."""
        if name is None:
            if self._default is None:
                raise ModelNotFound("no model is configured")
            name = self._default
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFound(
                f"model {name!r} is not served; served models: {sorted(self._slots)}", model=name
            )
        active = slot.active
        if active is None or slot.state != "ready":
            raise NotReady(f"model {name!r} is {slot.state}" + (f": {slot.error}" if slot.error else ""))
        return active

    @property
    def default_model(self) -> str | None:
        return self._default

    def slots(self) -> list[ModelSlot]:
        return list(self._slots.values())

    def find(self, name: str) -> ModelSlot:
        """A slot in any state (404 if unknown): for metadata routes."""
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFound(
                f"model {name!r} is not served; served models: {sorted(self._slots)}", model=name
            )
        return slot

    def ready(self) -> bool:
        return not self.shutting_down and all(s.state == "ready" for s in self._slots.values())

    def describe(self, slot: ModelSlot) -> dict[str, Any]:
        batch = self._settings.batch
        out: dict[str, Any] = {"name": slot.name, "uri": slot.spec.uri, "state": slot.state}
        if slot.error:
            out["error"] = slot.error
        if slot.active is not None:
            model = slot.active.model
            info = model.runtime.info
            out |= {
                "alias": model.ref.alias,
                "version": model.ref.version,
                "flavor": model.flavor,
                "runtime": info.runtime,
                "device": info.device,
                "providers": list(info.providers),
                "signature": {
                    "inputs": [s.describe() for s in model.inputs],
                    "outputs": [s.describe() for s in model.outputs],
                },
            }
        out["batching"] = {
            "enabled": batch.enabled,
            "max_rows": batch.max_rows,
            "max_wait_ms": batch.max_wait_ms,
            "queue_rows": batch.queue_rows,
            "timeout_ms": batch.timeout_ms,
        }
        return out

    # -- the hot path ------------------------------------------------------------------------------
    async def predict(
        self,
        name: str | None,
        inputs: Any,
        *,
        protocol: str = "ferry",
        params: Mapping[str, Any] | None = None,
        cache_control: str | None = None,
    ) -> Prediction:
        """Validate ``inputs`` (decoded JSON) against the model's signature and compute them."""
        started = time.perf_counter()
        active = self.active(name)
        try:
            arrays, rows = decode_inputs(active.model.inputs, inputs)
        except InvalidInput:
            active.metrics.invalid.inc()
            raise
        return await self.compute(
            active,
            arrays,
            rows,
            protocol=protocol,
            params=params,
            cache_control=cache_control,
            started=started,
        )

    async def compute(
        self,
        active: ActiveVersion,
        arrays: dict[str, np.ndarray],
        rows: int,
        *,
        protocol: str,
        params: Mapping[str, Any] | None = None,
        cache_control: str | None = None,
        started: float | None = None,
    ) -> Prediction:
        """Answer validated arrays from the cache or the version's batcher; the answer names the version.

        The cache works per request: the key covers every row, so a repeat of the same request is a
        hit. ``cache_control`` ``no-cache`` skips the lookup but stores the result, ``no-store`` does
        neither. Identical requests in flight at once run the model once.
        """
        started = started if started is not None else time.perf_counter()
        if rows > self._max_rows:
            raise PayloadTooLarge(
                f"{rows} rows in one request; the limit is {self._max_rows} (FERRY_LIMITS__MAX_ROWS)",
                rows=rows,
            )
        model, cache = active.model, self._cache
        name, version = model.name, model.ref.version
        key = None
        if cache is not None and cache_control != "no-store" and cache.enabled(name):
            try:
                key = cache_key(name, version, arrays, params)
            except TypeError:  # inputs the cache cannot key (strings): compute them every time
                key = None
        if key is not None and cache is not None and cache_control != "no-cache":
            value, _tier = await cache.get(name, key)
            if value is not None:
                outputs = decode_outputs(value)
                active.metrics.total_s.observe(time.perf_counter() - started)
                active.metrics.answered(protocol, rows)
                LAST_ANSWER.set(Answered(name, rows, protocol, active.metrics, cache.ttl_s(name)))
                return Prediction(name, version, outputs, cache="hit")
        gone = CLIENT_GONE.get()
        if key is None:
            outputs = await self._run(active, arrays, rows, params, gone)
        else:
            outputs = await active.flights.run(
                key, lambda all_gone: self._run(active, arrays, rows, params, all_gone), gone
            )
            assert cache is not None
            with contextlib.suppress(TypeError):  # outputs the cache cannot hold (strings) stay uncached
                await cache.set(name, key, encode_outputs(outputs), cache.ttl_s(name))
        active.metrics.total_s.observe(time.perf_counter() - started)
        active.metrics.answered(protocol, rows)
        ttl = cache.ttl_s(name) if key is not None and cache is not None and cache_control is None else None
        LAST_ANSWER.set(Answered(name, rows, protocol, active.metrics, ttl))
        return Prediction(name, version, outputs)

    async def _run(
        self,
        active: ActiveVersion,
        arrays: dict[str, np.ndarray],
        rows: int,
        params: Mapping[str, Any] | None = None,
        gone: Probe | None = None,
    ) -> dict[str, np.ndarray]:
        m = active.metrics
        try:
            result = await active.batcher.submit(arrays, rows, self._timeout_s, params, gone)
        except Overloaded:
            m.overload.inc()
            raise
        except DeadlineExceeded:
            m.timeout.inc()
            raise
        m.queue_s.observe(result.queue_s)
        m.compute_s.observe(result.compute_s)
        return result.outputs


def _clear(slot: ModelSlot, loading: Loading) -> None:
    """A finished load stops being the slot's load in progress (unless a later one already is)."""
    if slot.loading is loading:
        slot.loading = None


def _load_failure(name: str, stage: str, exc: Exception) -> FerryError:
    """Any exception of a load as a Ferry error: one Ferry does not know (a full disk while downloading,
    a bug in a model's code) becomes a ``ModelLoadError``, logged once with its traceback."""
    if isinstance(exc, FerryError):
        return exc
    log.error("model %s: %s failed", name, stage, exc_info=exc)
    return ModelLoadError(f"model {name} failed at {stage}: {exc!r}")
