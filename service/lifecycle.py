"""The model lifecycle: which models are served, and each one's way from a registry version to the
version that answers (``ModelSlot``: loading → ready, or failed; a new version is loaded, warmed up and
swapped in with one reference assignment, then the old one drains and is retired; ready → unloaded when
the memory budget evicts it or the repository API unloads it).

With a memory budget (``FERRY_MEMORY__BUDGET_BYTES``, ``budget.py``) start-up loads the models in the
listed order while they fit, the others stay unloaded; a request for an unloaded model loads it
(``serving``), first unloading the least recently used idle models (no request queued or in flight)
when it would not fit; ``OverBudget`` (503) when even that would not make room.

``ModelSet`` is used by start-up (``api/app.py``), the reloader, the admin API and the pipeline
(``pipeline.py``, which asks it for the version answering a model now). Every load of a model goes
through ``ModelSet.load``: at most one runs per model at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.batcher import Batcher
from service.budget import MemoryBudget, files_size, human
from service.cache import SingleFlight
from service.challenger import challenger_uri
from service.columns import is_table
from service.config import Settings
from service.errors import (
    ConfigurationError,
    DeadlineExceeded,
    FerryError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    NotReady,
    OverBudget,
    RegistryUnavailable,
)
from service.metrics import Metrics, ModelMetrics
from service.registry import LoadedModel, ModelRef, ModelRegistry, ModelSpec

log = logging.getLogger(__name__)

COORDINATED_REASONS = frozenset({"reload", "admin", "repository"})
"""With worker processes, loads for these reasons are rounds over every worker (``swaps.py``); start-up,
first-request and ``sync`` loads are a worker's own."""


class Coordination(Protocol):
    """What ``ModelSet`` needs from the worker's side of coordinated swaps (``swaps.SwapClient``)."""

    async def change(
        self,
        action: str,
        name: str,
        uri: str | None = None,
        ref: ModelRef | None = None,
        reason: str = "admin",
    ) -> None:
        """Run ``action`` (load, add, remove, unload) on every worker; raises when it was rejected."""

    def report(self, name: str, uri: str, ref: ModelRef, seconds: float) -> None:
        """This worker loaded ``ref`` of ``name`` on its own, in ``seconds``."""


class ModelState(enum.StrEnum):
    """Where a served model stands (``GET /models``, ``/health/ready``)."""

    LOADING = "loading"
    """No version answers yet; the first is loading."""
    READY = "ready"
    """A version answers."""
    FAILED = "failed"
    """No version answers: the last load failed (the reloader retries it with backoff)."""
    STOPPED = "stopped"
    """The server is shutting down."""
    UNLOADED = "unloaded"
    """No version is loaded: the memory budget left it out (it loads on its next request) or the
    repository API unloaded it (it loads when asked to)."""


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
    reason: str = "reload"
    """Why (``ferry_model_loads_total``): startup, first_request, reload, admin, repository, sync."""
    evict: bool = True
    """Whether it may unload idle models to fit the memory budget."""
    gate: Callable[[], Awaitable[None]] | None = None
    """With worker processes, a round's load (``swaps.py``): awaited once the version is warmed up and
    before it is swapped in; it returns when every worker staged it, raises when the round aborted."""
    task: asyncio.Task[ModelSlot] = field(init=False)

    def joins(self, uri: str, ref: ModelRef | None) -> bool:
        """Whether a caller asking for ``uri`` (resolved to ``ref``, if it already was) gets what this
        load will give: the same URI, and no version known on either side that differs."""
        return (
            self.uri == uri and (ref is None or self.version is None or self.version == ref.version)
        ) and not self.task.done()


@dataclass(frozen=True, slots=True)
class Refusal:
    """A load the budget refused: the same answer stands until ``until`` (``time.monotonic()``), or,
    unless the model is larger than the whole budget, until a model becomes idle or is unloaded."""

    until: float
    error: OverBudget
    whole: bool


@dataclass(slots=True)
class ModelSlot:
    """One served model: its configuration, its state and the version that answers now."""

    spec: ModelSpec
    state: ModelState = ModelState.LOADING
    active: ActiveVersion | None = None
    error: str | None = None
    loading: Loading | None = None
    """The load in progress, if any: at most one per model at a time (see ``ModelSet.load``)."""
    users: int = 0
    """Requests using the model now, from choosing its version to their answer: never evicted then."""
    on_demand: bool = False
    """The memory budget manages it: unloaded, it loads on its next request, and readiness does not
    wait for it."""
    size_bytes: int | None = None
    """Its last loaded version's files on disk (measured under a memory budget only)."""
    parked: ModelRef | None = None
    """The version last unloaded, whose downloaded files are kept for its next load."""
    refused: Refusal | None = None
    """Its last load's ``OverBudget``, answered again to its requests for a moment."""
    challenger: ActiveVersion | None = None
    """The version under the challenger alias, loaded beside ``active`` (``FERRY_CHALLENGER__MODE``
    shadow or canary; ``challenger.py``); ``None`` when there is none."""

    @property
    def name(self) -> str:
        return self.spec.name


class ModelSet:
    """The served models: loads them, swaps versions in, retires old ones, answers which version
    serves a model now."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics) -> None:
        self._settings = settings
        self._registry = registry
        self._metrics = metrics
        specs = [ModelSpec.parse(entry) for entry in settings.models]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"model names must be unique, got {names}")
        self._slots: dict[str, ModelSlot] = {s.name: ModelSlot(s) for s in specs}
        for name in names:
            metrics.model_served(name)
        default = settings.default_model or (names[0] if names else None)
        if default is not None and default not in self._slots:
            raise ConfigurationError(f"default model {default!r} is not among the served models {names}")
        self._default = default
        self._budget = MemoryBudget(settings.memory.budget_bytes)
        self._refused: set[str] = set()
        """Models whose refused load may fit once another model is idle or unloaded."""
        self._challenger_locks: dict[str, asyncio.Lock] = {}
        """One challenger load or drop per model at a time (start-up and the reloader both follow it)."""
        self._background: set[asyncio.Task[bool]] = set()
        self._challenger_rejected: dict[str, tuple[str, float]] = {}
        """Per model: the challenger source that last failed to load, and when to try it again."""
        if settings.challenger.mode != "off":
            for spec in specs:
                if self.challenger_uri(spec) is not None:
                    metrics.challenger_served(spec.name)
        metrics.memory_budget.set(settings.memory.budget_bytes or 0)
        self.coordinator: Coordination | None = None
        """With worker processes (``swaps.py``): changes for the reasons in ``COORDINATED_REASONS`` go
        through it, as rounds over every worker."""
        self.pinned: dict[str, ModelRef] = {}
        """With worker processes: the version each model last swapped in, loaded again by a first request
        or a start-up (committed across workers), never a newer one resolved on its own."""
        self.shutting_down = False
        self.generation = 0
        """Bumped whenever the set of answering versions changes (swap, add, remove): replayed responses
        are keyed on it, so none outlives the version that computed it."""

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every configured model at once; a broken one is reported, not fatal (bad settings are).
        MLflow's loaders that are not thread-safe are serialized in the registry, downloads are not.
        Under a memory budget one after the other in the listed order, each that still fits (a model
        that does not stays unloaded until its first request; nothing is evicted at start-up)."""
        slots = [s for s in self._slots.values() if s.state != ModelState.UNLOADED]  # pinned unloaded
        if self._budget.enabled:
            results: list[BaseException | ModelSlot] = []
            for slot in slots:
                try:
                    ref = self.pinned.get(slot.name)
                    results.append(await self.load(slot.name, ref=ref, reason="startup", evict=False))
                except FerryError as exc:
                    results.append(exc)
        else:
            results = await asyncio.gather(
                *(self.load(s.name, ref=self.pinned.get(s.name), reason="startup") for s in slots),
                return_exceptions=True,
            )
        for slot, result in zip(slots, results, strict=True):
            if isinstance(result, ConfigurationError):
                raise result
            if isinstance(result, OverBudget):
                log.info("model %s not loaded at start-up, it loads on its first request: %s",
                         slot.name, result.message)  # fmt: skip
            elif isinstance(result, FerryError):
                log.error("model %s not loaded: %s", slot.name, result.message)
            elif isinstance(result, BaseException):  # cancelled: the server is stopping
                raise result
        for slot in slots:
            if self.challenger_uri(slot.spec) is not None:
                await self.follow_challenger(slot.name)

    def loading(self, name: str) -> bool:
        """Whether a load of ``name`` is in progress (the reloader then skips its poll)."""
        slot = self._slots.get(name)
        return slot is not None and slot.loading is not None and not slot.loading.task.done()

    async def load(
        self,
        name: str,
        uri: str | None = None,
        ref: ModelRef | None = None,
        *,
        reason: str = "reload",
        evict: bool = True,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> ModelSlot:
        """Resolve (unless ``ref`` is given), download, load and warm up a version of ``name``, then swap
        it in with one reference assignment and drain the old version. A version that fails any step
        is never swapped in: the old one keeps serving. Under a memory budget the downloaded files are
        measured first and, with ``evict``, the least recently used idle models are unloaded to make
        room (``OverBudget`` when that cannot be done: the model is not loaded).

        Every load of a model goes through here (start-up, the reloader, the admin API), and at most
        one runs per model: a caller asking for what the load in progress will give joins it; any other
        load waits for it to finish. MLflow's loaders keep process-wide state, so two loads of one
        version at once fail or load it twice. A caller that is cancelled leaves the load running.

        With worker processes a load for a reason in ``COORDINATED_REASONS`` (the reloader, the admin
        and repository APIs) is proposed as a round instead (``swaps.py``); the round's own load on each
        worker comes back here with its ``gate``."""
        if gate is None and self.coordinator is not None and reason in COORDINATED_REASONS:
            self.find(name)
            await self.coordinator.change("load", name, uri, ref, reason)
            return self.find(name)
        slot = self._slots[name]
        uri = uri or slot.spec.uri
        pending = slot.loading
        if pending is not None and pending.joins(uri, ref):
            return await asyncio.shield(pending.task)
        before = pending.task if pending is not None and not pending.task.done() else None
        loading = Loading(uri, ref.version if ref is not None else None, reason, evict, gate)
        if slot.state == ModelState.UNLOADED:
            slot.state = ModelState.LOADING
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
        size: int | None = None
        try:
            if ref is None:
                ref = await asyncio.to_thread(self._registry.resolve, spec.uri)
                loading.version = ref.version
            stage = "load"
            if self._budget.enabled:
                local = await asyncio.to_thread(self._registry.download, name, ref)
                size = await asyncio.to_thread(files_size, local)
                await self._make_room(slot, size, loading.evict)
            model = await asyncio.to_thread(self._registry.load, name, ref)
            stage = "warmup"
            batcher, slot_metrics = await self._warmed(name, model)
            if loading.gate is not None:  # every worker staged it, or the round aborted
                # No await from here to the swap below: the gate's "done" and the swap share a turn.
                stage = "swap"
                try:
                    await loading.gate()
                except BaseException:
                    await batcher.close(drain=False)
                    model.runtime.close()
                    raise
        except BaseException as exc:
            self._recharge(slot)  # what it reserved goes back; what answers stays charged
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, OverBudget):
                if slot.active is None:
                    slot.state, slot.error = ModelState.UNLOADED, exc.message
                    with contextlib.suppress(KeyError):
                        self._metrics.model_ready.remove(name)
                    # The repository API's unload holds until a load succeeds; else it loads on demand.
                    slot.on_demand = slot.on_demand or loading.reason != "repository"
                    whole = size is not None and size > (self._budget.limit or 0)
                    if loading.evict or whole:  # one that evicted nothing says nothing of a request's
                        slot.refused = Refusal(time.monotonic() + exc.retry_after_s, exc, whole)
                        if not whole:
                            self._refused.add(name)
                raise
            failure = _load_failure(name, stage, exc)
            self._metrics.load_failures.labels(name, stage).inc()
            if slot.active is None:
                slot.state, slot.error = ModelState.FAILED, failure.message
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
        slot.state, slot.error = ModelState.READY, None
        parked, slot.parked, slot.refused = slot.parked, None, None
        if size is not None:
            slot.size_bytes = size
        self._metrics.load_duration.labels(name).observe(time.perf_counter() - started)
        self._metrics.model_ready.labels(name).set(1)
        self._metrics.model_info.labels(*labels).set(1)
        self._metrics.model_loads.labels(name, loading.reason).inc()
        self._metrics.memory_used.set(self._budget.used)
        log.info(
            "model %s v%s loaded (%s) and ready (%s on %s) in %.2fs%s",
            name, ref.version, loading.reason, model.flavor, info.device, time.perf_counter() - started,
            f"; {human(size)} of the memory budget, {human(self._budget.used)} of "
            f"{human(self._budget.limit or 0)} in use" if size is not None else "",
        )  # fmt: skip
        if self.coordinator is not None:
            self.pinned[name] = ref
            if (
                loading.gate is None
            ):  # its own load: the supervisor corrects it if another version is committed
                self.coordinator.report(name, spec.uri, ref, time.perf_counter() - started)
        if old is not None:
            await self._retire(old)
        elif parked is not None and parked.source != ref.source:  # the alias moved while it was unloaded
            await self._discard_unused(parked)
        return slot

    async def _make_room(self, slot: ModelSlot, size: int, evict: bool) -> None:
        """Charge ``size`` bytes to ``slot`` against the budget, unloading the least recently used idle
        models first where it would not fit (only with ``evict``). The choice and the charge happen
        without yielding to the event loop: two loads never count the same free bytes."""
        idle = [s.name for s in self._slots.values() if s is not slot and _idle(s)] if evict else []
        try:
            victims = self._budget.plan(slot.name, size, idle)
        except OverBudget as exc:
            limit = self._budget.limit or 0
            if evict or size > limit:
                raise
            free = limit - (self._budget.used - self._budget.charged(slot.name))
            raise OverBudget(
                f"model {slot.name!r} needs {human(size)} but {human(max(free, 0))} of the memory budget "
                f"of {human(limit)} (FERRY_MEMORY__BUDGET_BYTES) is free; nothing is unloaded for it at "
                "start-up or on a retry: it loads on its first request",
                **exc.details,
            ) from None
        why = (
            f"evicted: the least recently used idle model, to make room for {slot.name} ({human(size)}) "
            f"in the memory budget of {human(self._budget.limit or 0)}"
        )
        olds = [self._detach(self._slots[v], "evicted", on_demand=True, why=why) for v in victims]
        self._budget.charge(slot.name, size)
        self._metrics.memory_used.set(self._budget.used)
        for old in olds:
            if old is not None:
                await self._retire(old, keep_files=True)

    def _detach(self, slot: ModelSlot, reason: str, *, on_demand: bool, why: str) -> ActiveVersion | None:
        """Stop answering with ``slot``'s version (new requests find it unloaded) and release its bytes;
        the caller retires the version returned."""
        old = slot.active
        slot.active, slot.state, slot.error, slot.on_demand = None, ModelState.UNLOADED, None, on_demand
        self._drop_challenger_soon(slot)
        freed = self._budget.release(slot.name)
        self._room_changed()
        with contextlib.suppress(KeyError):  # unloaded on purpose: no series, no not-ready alert
            self._metrics.model_ready.remove(slot.name)
        self._metrics.memory_used.set(self._budget.used)
        if old is not None:
            slot.parked = old.model.ref
            self._metrics.model_unloads.labels(slot.name, reason).inc()
            log.info(
                "model %s v%s unloaded (%s)%s", slot.name, old.version, why,
                f"; {human(freed)} freed, {human(self._budget.used)} in use" if self._budget.enabled else "",
            )  # fmt: skip
        return old

    def _room_changed(self) -> None:
        """A model became idle or was unloaded: a refused load may fit now."""
        if not self._refused:
            return
        for name in self._refused:
            slot = self._slots.get(name)
            if slot is not None and slot.refused is not None and not slot.refused.whole:
                slot.refused = None
        self._refused.clear()

    def _recharge(self, slot: ModelSlot) -> None:
        """After a load that did not swap in: the budget charges ``slot`` what answers now, if anything."""
        if not self._budget.enabled or self._slots.get(slot.name) is not slot:
            return
        if slot.active is None:
            self._budget.release(slot.name)
        else:
            self._budget.charge(slot.name, slot.size_bytes or 0)
        self._metrics.memory_used.set(self._budget.used)

    async def unload(self, name: str, reason: str = "repository", *, local: bool = False) -> None:
        """Unload ``name`` but keep serving it by name (the repository API): it stays listed, unloaded,
        until a load asks for it again; its requests get 503 meanwhile. A load in progress is cancelled.
        With worker processes, on every worker (``local``: this one only, as a round applies it)."""
        slot = self.find(name)
        if not local and self.coordinator is not None:
            await self.coordinator.change("unload", name, reason=reason)
            return
        if slot.loading is not None:
            slot.loading.task.cancel()
        old = self._detach(slot, reason, on_demand=False, why=f"{reason} API")
        self.generation += 1
        if old is not None:
            await self._retire(old, keep_files=True)

    def serving(self, name: str | None, timeout_s: float) -> InUse:
        """``async with models.serving(name, timeout_s) as active``: the version answering ``name``
        (``None``: the default model), held in use until the block ends: a model in use is never
        evicted. A model the budget unloaded is loaded first (concurrent first requests share the one
        load), waiting at most ``timeout_s`` for it. (A class, not a generator: this is on every
        request's path, and ``contextlib.asynccontextmanager`` costs 2 µs more per use.)"""
        return InUse(self, self._slot(name), timeout_s)

    async def _enter(self, slot: ModelSlot, timeout_s: float) -> ActiveVersion:
        slot.users += 1
        try:
            if (
                slot.active is None
                and slot.on_demand
                and slot.state in (ModelState.UNLOADED, ModelState.LOADING)
                and not self.shutting_down
            ):
                await self._load_on_demand(slot, timeout_s)
            active = self.active(slot.name)
        except BaseException:
            self._leave(slot)
            raise
        self._budget.touch(slot.name)
        return active

    def _leave(self, slot: ModelSlot) -> None:
        slot.users -= 1
        if not slot.users:
            self._room_changed()

    async def _load_on_demand(self, slot: ModelSlot, timeout_s: float) -> None:
        refused = slot.refused
        if refused is not None and time.monotonic() < refused.until:
            # Refused a moment ago and nothing freed since: the same answer until its Retry-After,
            # without asking the registry again for every request meanwhile.
            raise OverBudget(refused.error.message, **refused.error.details)
        try:
            async with asyncio.timeout(timeout_s):
                await self.load(slot.name, ref=self.pinned.get(slot.name), reason="first_request")
        except TimeoutError:
            raise DeadlineExceeded(
                f"model {slot.name!r} did not load within the request's deadline of {timeout_s:g} s "
                "(FERRY_BATCH__TIMEOUT_MS); it goes on loading"
            ) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise NotReady(f"model {slot.name!r} was unloaded while it loaded") from None

    async def add(
        self,
        name: str,
        uri: str,
        reason: str = "admin",
        *,
        ref: ModelRef | None = None,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> ModelSlot:
        """Serve a new model, or an existing one from a new URI (admin and repository APIs); with worker
        processes, on every worker (a round: ``load``)."""
        try:
            spec = ModelSpec.parse(f"{name}={uri}")
        except ConfigurationError as exc:
            raise InvalidInput(exc.message, field="uri") from None
        if gate is None and self.coordinator is not None and reason in COORDINATED_REASONS:
            await self.coordinator.change("add", spec.name, spec.uri, ref, reason)
            return self.find(spec.name)
        if spec.name in self._slots:
            return await self.load(spec.name, spec.uri, ref, reason=reason, gate=gate)
        self._slots[spec.name] = ModelSlot(spec)
        self._metrics.model_served(spec.name)
        if self._default is None:
            self._default = spec.name
        return await self.load(spec.name, ref=ref, reason=reason, gate=gate)

    def apply_pins(self, models: Mapping[str, tuple[str, ModelRef | None, bool]], removed: set[str]) -> None:
        """Before start-up, in a worker that (re)starts: the state committed across workers. A model the
        admin or repository API added is served from its URI, a removed one is not, an unloaded one stays
        unloaded, and each loads its committed version (``pinned``)."""
        for name in removed & set(self._slots):
            del self._slots[name]
            if self._default == name:
                self._default = next(iter(self._slots), None)
        for name, (uri, ref, unloaded) in models.items():
            if name not in self._slots:
                self._slots[name] = ModelSlot(ModelSpec.parse(f"{name}={uri}"))
                self._metrics.model_served(name)
                self._default = self._default or name
            elif uri:
                self._slots[name].spec = ModelSpec(name, uri)
            if ref is not None:
                self.pinned[name] = ref
            if unloaded:
                self._slots[name].state = ModelState.UNLOADED

    async def remove(self, name: str, reason: str = "admin", *, local: bool = False) -> None:
        """Stop serving ``name``: new requests get 404, queued ones finish, then the model is freed. With
        worker processes, on every worker (``local``: this one only, as a round applies it)."""
        slot = self.find(name)
        if not local and self.coordinator is not None:
            await self.coordinator.change("remove", name, reason=reason)
            return
        del self._slots[name]
        self.pinned.pop(name, None)
        if slot.loading is not None:
            slot.loading.task.cancel()
        self.generation += 1
        if self._default == name:
            self._default = next(iter(self._slots), None)
        with contextlib.suppress(KeyError):
            self._metrics.model_ready.remove(name)
        self._budget.forget(name)
        self._drop_challenger_soon(slot)
        self._room_changed()
        self._metrics.memory_used.set(self._budget.used)
        if slot.active is not None:
            self._metrics.model_unloads.labels(name, reason).inc()
            log.info("model %s v%s unloaded (%s API) and no longer served", name, slot.active.version, reason)
            await self._retire(slot.active)

    async def _retire(self, old: ActiveVersion, keep_files: bool = False) -> None:
        """Drain an old version's queued requests, free it, drop its per-version gauges, and delete its
        downloaded files unless another served model answers from the same source (or ``keep_files``:
        an unloaded model's files stay for its next load)."""
        await old.close()
        if not keep_files:
            await self._discard_unused(old.model.ref)
        name, version = old.model.name, old.version
        with contextlib.suppress(KeyError):
            self._metrics.model_info.remove(*old.info_labels)
        for gauge in (self._metrics.queue_rows, self._metrics.queue_capacity_rows):
            with contextlib.suppress(KeyError):
                gauge.remove(name, version)

    async def _discard_unused(self, ref: ModelRef) -> None:
        if any(
            v is not None and v.model.ref.source == ref.source
            for s in self._slots.values()
            for v in (s.active, s.challenger)
        ):
            return
        try:
            await asyncio.to_thread(self._registry.discard, ref)
        except Exception:
            log.exception("model v%s: could not delete its downloaded files (%s)", ref.version, ref.source)

    async def close(self) -> None:
        self.shutting_down = True
        loads = [s.loading.task for s in self._slots.values() if s.loading is not None]
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        for slot in self._slots.values():
            for version in (slot.active, slot.challenger):
                if version is not None:
                    await version.close()
            slot.state = ModelState.STOPPED

    async def _warmed(self, name: str, model: LoadedModel) -> tuple[Batcher, ModelMetrics]:
        """``model``'s batcher and metrics, after its warm-up; a failed warm-up frees both the batcher
        and the model before it raises."""
        batcher, slot_metrics = self._batcher(name, model)
        try:
            await self._warm_up(name, model, batcher)
        except BaseException:
            await batcher.close(drain=False)
            model.runtime.close()
            raise
        return batcher, slot_metrics

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
            # Only compute runs inline: a pyfunc model's own code may wait (I/O, a lock) and hold the loop.
            inline_max_s=batch.inline_max_us / 1e6 if model.flavor in ("onnx", "pytorch") else 0.0,
        )
        return batcher, slot_metrics

    async def _warm_up(self, name: str, model: LoadedModel, batcher: Batcher) -> None:
        """Run the logged input example (or zeros of the signature's shape) and check the outputs."""
        if not self._settings.warmup:
            return
        example = model.input_example
        if example is None and (is_table(model.inputs) or not model.inputs):
            # No zeros stand in for a table's strings or a model without a signature: it is checked
            # by its first request instead.
            log.warning("model %s v%s has no input example: warm-up skipped", name, model.ref.version)
            return
        if example is None:
            example = {
                s.name: np.zeros(tuple(1 if d < 0 else d for d in s.shape), dtype=s.dtype)
                for s in model.inputs
            }
        try:
            if not is_table(model.inputs) and model.inputs:  # a table's example is decoded already
                example = {s.name: np.ascontiguousarray(example[s.name], dtype=s.dtype) for s in model.inputs}
            rows = int(next(iter(example.values())).shape[0])
            result = await batcher.submit(example, rows, max(self._settings.batch.timeout_ms / 1000, 60.0))
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

    # -- the challenger ------------------------------------------------------------------------------
    def challenger_uri(self, spec: ModelSpec) -> str | None:
        """Where ``spec``'s challenger comes from (``None``: challenger traffic is off, or the model is
        not served from a registry alias)."""
        settings = self._settings.challenger
        return None if settings.mode == "off" else challenger_uri(spec.uri, settings.alias)

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def challenger(self, name: str) -> ActiveVersion | None:
        """The challenger version loaded beside ``name``, if it can take requests."""
        slot = self._slots.get(name)
        version = slot.challenger if slot is not None else None
        return None if version is None or version.batcher.closing else version

    async def follow_challenger(self, name: str) -> str:
        """Look up ``name``'s challenger alias once and make the loaded challenger match it: load a new
        version (downloaded, loaded and warmed up as any version; charged to the memory budget as
        ``NAME@ALIAS``, never evicting a model for it), keep the one loaded, or drop it when the alias
        is gone, points at the champion's version, or the champion is not loaded. Returns what happened
        (start-up and the reloader call it; a failure is logged, the champion is never affected)."""
        slot = self._slots.get(name)
        uri = self.challenger_uri(slot.spec) if slot is not None else None
        if slot is None or uri is None:
            return "none"
        lock = self._challenger_locks.setdefault(name, asyncio.Lock())
        async with lock:
            champion = slot.active
            if champion is None or slot.state != ModelState.READY:
                await self._drop_challenger(slot, "the model is not loaded")
                return "no-champion"
            try:
                ref = await asyncio.to_thread(self._registry.resolve, uri)
            except ModelNotFound:
                dropped = await self._drop_challenger(slot, f"{uri} names no version")
                return "removed" if dropped else "absent"
            except RegistryUnavailable:
                return "registry-down"
            if ref.source == champion.model.ref.source:
                await self._drop_challenger(slot, "the challenger alias names the champion's version")
                return "champion"
            current = slot.challenger
            if current is not None and current.model.ref.source == ref.source:
                return "unchanged"
            rejected = self._challenger_rejected.get(name)
            if rejected is not None and rejected[0] == ref.source and time.monotonic() < rejected[1]:
                return "backoff"  # the same version failed a moment ago: tried again after a while
            try:
                new = await self._load_challenger(slot, ref)
            except FerryError as exc:
                wait = self._settings.reload.max_backoff_s
                self._challenger_rejected[name] = (ref.source, time.monotonic() + wait)
                log.error("model %s challenger v%s not loaded (tried again in %.0fs, or when its alias "
                          "moves): %s", name, ref.version, wait, exc.message)  # fmt: skip
                return "rejected"
            self._challenger_rejected.pop(name, None)
            if slot.challenger is not current or self._slots.get(name) is not slot or slot.active is None:
                await self._retire_challenger(slot, new)  # the model went meanwhile
                return "no-champion"
            slot.challenger = new
            self.generation += 1
            self._metrics.challenger_ready.labels(name).set(1)
            self._metrics.model_info.labels(*new.info_labels).set(1)
            previous = f" (was v{current.version})" if current is not None else ""
            log.info("model %s challenger v%s loaded and ready beside v%s%s",
                     name, new.version, slot.active.version, previous)  # fmt: skip
            if current is not None:
                await self._retire_challenger(slot, current)
            return "loaded"

    async def _load_challenger(self, slot: ModelSlot, ref: ModelRef) -> ActiveVersion:
        """Download, load and warm up the challenger ``ref`` of ``slot`` (the champion's load steps)."""
        name, key = slot.name, self._challenger_key(slot)
        reserved, size = False, 0
        try:
            if self._budget.enabled:
                local = await asyncio.to_thread(self._registry.download, name, ref)
                size = await asyncio.to_thread(files_size, local)
                self._budget.plan(key, size, ())  # OverBudget unless it fits without evicting
                if slot.challenger is None:
                    self._budget.charge(key, size)
                    reserved = True
                self._metrics.memory_used.set(self._budget.used)
            model = await asyncio.to_thread(self._registry.load, name, ref)
            batcher, slot_metrics = await self._warmed(name, model)
        except BaseException as exc:
            if reserved:
                self._budget.release(key)
                self._metrics.memory_used.set(self._budget.used)
            if isinstance(exc, Exception) and not isinstance(exc, FerryError):
                raise _load_failure(name, "challenger load", exc) from exc
            raise
        if self._budget.enabled:
            self._budget.charge(key, size)
            self._metrics.memory_used.set(self._budget.used)
        info = model.runtime.info
        labels = (name, ref.version, ref.alias or "", model.flavor, info.runtime, info.device,
                  ",".join(info.providers))  # fmt: skip
        return ActiveVersion(
            model, batcher, slot_metrics, SingleFlight(self._metrics, name), time.time(), labels
        )

    def _challenger_key(self, slot: ModelSlot) -> str:
        """The challenger's name in the memory budget: never a served model's name (``@`` is not allowed
        in one), so it is never chosen for eviction."""
        return f"{slot.name}@{self._settings.challenger.alias}"

    async def _drop_challenger(self, slot: ModelSlot, why: str) -> bool:
        old = slot.challenger
        if old is None:
            return False
        slot.challenger = None
        self.generation += 1
        self._metrics.challenger_ready.labels(slot.name).set(0)
        self._budget.forget(self._challenger_key(slot))
        self._metrics.memory_used.set(self._budget.used)
        log.info("model %s challenger v%s unloaded: %s", slot.name, old.version, why)
        await self._retire_challenger(slot, old)
        return True

    def _drop_challenger_soon(self, slot: ModelSlot) -> None:
        """From code that cannot wait (its model is being unloaded): the challenger goes with it."""
        if slot.challenger is not None:
            task = asyncio.get_running_loop().create_task(
                self._drop_challenger(slot, "its model was unloaded")
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _retire_challenger(self, slot: ModelSlot, old: ActiveVersion) -> None:
        """As ``_retire``, but the per-version gauges stay when the champion now has the same version
        (the alias was promoted: the series are the champion's)."""
        await old.close()
        await self._discard_unused(old.model.ref)
        with contextlib.suppress(KeyError):
            self._metrics.model_info.remove(*old.info_labels)
        champion = slot.active
        if champion is not None and champion.version == old.version:
            return
        for gauge in (self._metrics.queue_rows, self._metrics.queue_capacity_rows):
            with contextlib.suppress(KeyError):
                gauge.remove(old.model.name, old.version)

    # -- queries -----------------------------------------------------------------------------------
    def _slot(self, name: str | None) -> ModelSlot:
        if name is None:
            if self._default is None:
                raise ModelNotFound("no model is configured")
            name = self._default
        return self.find(name)

    def active(self, name: str | None) -> ActiveVersion:
        """The version answering ``name`` (``None``: the default model); 404 if unknown, 503 if not ready."""
        slot = self._slot(name)
        name = slot.name
        active = slot.active
        if active is None or slot.state != ModelState.READY:
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
        """Every model that should be loaded is: not those the memory budget manages, nor unloaded ones."""
        return not self.shutting_down and all(
            s.state in (ModelState.READY, ModelState.UNLOADED) or s.on_demand for s in self._slots.values()
        )

    @property
    def budget(self) -> MemoryBudget:
        return self._budget


class InUse:
    """``ModelSet.serving``'s context: holds a model in use from choosing its version to the answer."""

    __slots__ = ("_models", "_slot", "_timeout_s")

    def __init__(self, models: ModelSet, slot: ModelSlot, timeout_s: float) -> None:
        self._models, self._slot, self._timeout_s = models, slot, timeout_s

    async def __aenter__(self) -> ActiveVersion:
        return await self._models._enter(self._slot, self._timeout_s)

    async def __aexit__(self, *exc: object) -> None:
        self._models._leave(self._slot)


def _idle(slot: ModelSlot) -> bool:
    """Whether ``slot`` may be evicted: loaded, no request queued or in flight, no load in progress."""
    active = slot.active
    return (
        slot.state == ModelState.READY
        and active is not None
        and slot.users == 0
        and active.batcher.queued_rows == 0
        and (slot.loading is None or slot.loading.task.done())
    )


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
