"""Alias following with zero downtime.

Every ``FERRY_RELOAD__POLL_S`` seconds the reloader resolves each served model's URI. When an alias
points at a new version, ``ModelSet.load`` loads and warms it up in the background and swaps it
in atomically; the old version drains its queue and is freed. A version that fails to load or warm up
is rejected (the old one keeps serving, readiness stays true, ``ferry_model_reloads_total`` and a log
line say why) and is retried with exponential backoff; a different version (the alias moved again) is
tried at once. Models that never loaded are retried the same way. A registry that does not answer is
logged once per outage and changes nothing.

With challenger traffic on (``FERRY_CHALLENGER__MODE``), each poll also looks up every model's
challenger alias after its champion (``ModelSet.follow_challenger``): a moved alias loads the new
challenger, a removed one (or one that names the champion's version) unloads it.

With worker processes (``FERRY_WORKERS`` > 1) only worker 0 polls the champions' aliases, and a moved
one is loaded as a round over every worker (``swaps.py``): swapped on all once all staged it, rejected
for all when one worker cannot load it. Every worker follows its challengers itself.

Under a memory budget it does not fight the budget: an unloaded model is left alone (its next load
resolves its alias anyway), and a retry of a model that never loaded unloads nothing to make room (it
stays unloaded until its first request when it does not fit).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from dataclasses import dataclass

from service.config import ReloadSettings
from service.errors import FerryError
from service.lifecycle import ModelSet, ModelSlot, ModelState
from service.metrics import Metrics
from service.registry import ModelRegistry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Rejected:
    version: str
    failures: int
    retry_at: float


class Reloader:
    """Polls the registry and swaps in new versions."""

    def __init__(
        self, service: ModelSet, registry: ModelRegistry, metrics: Metrics, settings: ReloadSettings
    ) -> None:
        self._service, self._registry, self._metrics = service, registry, metrics
        self._settings = settings
        self._rejected: dict[str, _Rejected] = {}
        self._registry_down = False

    async def run(self, champions: bool = True) -> None:
        """Poll forever (cancel to stop). ``champions=False``: follow the challengers only (with worker
        processes, every worker but the leader: the leader's polls move the champions of all)."""
        while True:
            await asyncio.sleep(self._settings.poll_s)
            await self.check_all(champions)

    async def check_all(self, champions: bool = True) -> None:
        """One poll of every model. Whatever goes wrong with one model is logged and leaves the others,
        and later polls, unaffected: alias following never stops."""
        for slot in self._service.slots():
            if self._service.shutting_down:
                return
            try:
                if champions:
                    await self.check(slot)
            except Exception:
                log.exception("model %s: alias check failed; trying again at the next poll", slot.name)
            if self._service.challenger_uri(slot.spec) is None:
                continue
            try:  # after the champion: a challenger is kept only beside a loaded champion
                await self._service.follow_challenger(slot.name)
            except Exception:
                log.exception("model %s: challenger check failed; trying again at the next poll", slot.name)

    async def check(self, slot: ModelSlot) -> str:
        """Look up ``slot``'s URI once; returns what happened (for tests and logs). A model whose load is
        in progress (start-up, the admin API) is skipped: that load is the one that counts, and so is an
        unloaded model: it follows its alias when it loads next."""
        if self._service.loading(slot.name):
            return "loading"
        if _unloaded(slot):
            return "unloaded"
        try:
            ref = await asyncio.to_thread(self._registry.resolve, slot.spec.uri)
        except FerryError as exc:
            if not self._registry_down:
                log.warning("registry lookup failed, serving the loaded versions: %s", exc.message)
            self._registry_down = True
            return "registry-down"
        if self._registry_down:
            log.info("registry answers again")
            self._registry_down = False
        active = slot.active
        if active is not None and active.model.ref.source == ref.source:
            self._rejected.pop(slot.name, None)
            return "unchanged"
        rejected = self._rejected.get(slot.name)
        if rejected is not None and rejected.version == ref.version and time.monotonic() < rejected.retry_at:
            return "backoff"
        if self._service.loading(slot.name):  # a load began while the registry answered
            return "loading"
        if _unloaded(slot):  # unloaded while the registry answered
            return "unloaded"
        try:
            # A model that never loaded does not push loaded ones out of the memory budget.
            await self._service.load(slot.name, ref=ref, reason="reload", evict=active is not None)
        except FerryError as exc:
            failures = rejected.failures + 1 if rejected and rejected.version == ref.version else 1
            wait = min(self._settings.max_backoff_s, max(self._settings.poll_s, 1.0) * 2 ** (failures - 1))
            self._rejected[slot.name] = _Rejected(ref.version, failures, time.monotonic() + wait)
            self._metrics.reloads.labels(slot.name, "rejected").inc()
            kept = f"v{active.version} keeps serving" if active is not None else "nothing serves it yet"
            log.error(
                "model %s v%s rejected (%s); %s; retry in %.0fs",
                slot.name,
                ref.version,
                exc.message,
                kept,
                wait,
            )
            return "rejected"
        self._rejected.pop(slot.name, None)
        self._metrics.reloads.labels(slot.name, "swapped").inc()
        gc.freeze()  # keep the new version's objects out of full collections too (see api/app.py)
        previous = f" (was v{active.version})" if active is not None else ""
        log.info("model %s now serves v%s%s", slot.name, ref.version, previous)
        return "swapped"


def _unloaded(slot: ModelSlot) -> bool:
    """Whether no version of ``slot`` is loaded and none should be until it is asked for."""
    return slot.state == ModelState.UNLOADED
