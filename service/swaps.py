"""Coordinated model changes across worker processes (``FERRY_WORKERS`` > 1): two-phase swaps.

Every change of what a model serves that is not local to one process (a moved alias, the admin API,
the model repository API, a webhook) becomes a *round* that the supervisor runs over every live worker:

- ``load`` and ``add`` (a new version, or a new model): **prepare** (each worker downloads, loads and
  warms the version beside the one answering, through ``ModelSet.load`` as always, then stops at its
  *gate* and says ``staged``) and **commit** (once every worker staged it, each swaps it in with one
  assignment and says ``swapped``, then ``done`` once the old version is retired). One ``failed`` (or
  a worker that does not stage within the prepare timeout) **aborts** the round: every worker drops
  what it staged and the old version keeps serving everywhere; the proposer gets the failing worker's
  error.
- ``remove`` and ``unload`` are **applied** on every worker at once (nothing to prepare).

Only worker 0 (the *leader*) polls the aliases; a webhook or an admin call reaches whichever worker
accepted its connection, which proposes the round itself. Rounds run one at a time, in order.

The supervisor keeps the *committed* state: for each model its URI, the version last committed and
whether it is unloaded, and the models removed. A worker that starts (again) asks for it first
(``hello`` → ``pins``) and loads exactly those versions, never newer ones, so a restart cannot skip
ahead of the others. A worker that loads on its own (start-up, a first request under the memory budget)
reports what it serves; if that differs from the committed version it is told to load that one. A worker
that joined while a round prepared (a restart) is told to load the committed version after the commit.

Messages are one JSON object per line over a Unix socket pair per worker (``CHANNEL_ENV``). The
supervisor's side, ``Coordinator``, is a state machine with no I/O (``received`` messages in,
``take()`` messages out); the worker's side is ``SwapClient`` (asyncio, in the worker's event loop).
Refs travel as dicts: the supervisor never imports a framework or the registry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.lifecycle import ModelSet
    from service.metrics import Metrics
    from service.registry import ModelRef, ModelRegistry

log = logging.getLogger("ferry")

CHANNEL_ENV = "_FERRY_WORKER_CHANNEL"
"""Internal (set by the supervisor): the worker's end of its socket pair to the supervisor."""
INDEX_ENV = "_FERRY_WORKER_INDEX"
"""Internal: the worker's index; worker 0 is the leader that polls the aliases."""
STAGED_ACTIONS = ("load", "add")
APPLIED_ACTIONS = ("remove", "unload")
PREPARE_MIN_S = 300.0
"""A round's prepare timeout: this, or three times the slowest load seen (a round's prepare, or a load a
worker reported), whichever is longer. It only ends a round whose worker is alive but stuck: a worker
that dies leaves the round at once."""
COMMIT_TIMEOUT_S = 30.0
"""A committed round is finished after this even if a worker never said ``done`` (its loop is stuck)."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


@dataclass(slots=True)
class Entry:
    """A model's committed state."""

    uri: str
    ref: dict[str, Any] | None
    unloaded: bool = False


@dataclass(slots=True)
class Round:
    id: int
    proposal: dict[str, Any]
    proposer: int | None
    request: int | None
    participants: set[int]
    waiting: set[int]
    phase: str  # prepare | commit | apply
    started: float
    committed_at: float = 0.0
    swapped: set[int] = field(default_factory=set)
    swapped_at: float | None = None
    """When the last participant said ``swapped`` (``ferry_swap_commit_seconds``)."""


@dataclass
class Coordinator:
    """The supervisor's side: committed state, the queue of proposals and the round in progress."""

    metrics: Metrics | None = None
    clock: Callable[[], float] = time.monotonic
    connected: set[int] = field(default_factory=set)
    entries: dict[str, Entry] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    round: Round | None = None
    slowest_s: float = 0.0
    commit_seconds: list[float] = field(default_factory=list)
    """The commit-to-last-``swapped`` time of every committed load (also ``ferry_swap_commit_seconds``)."""
    _queue: deque[tuple[int, int, dict[str, Any]]] = field(default_factory=deque)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _outbox: list[tuple[int, dict[str, Any]]] = field(default_factory=list)

    # -- I/O ------------------------------------------------------------------------------------------
    def take(self) -> list[tuple[int, dict[str, Any]]]:
        """The messages to send, as ``(worker, message)``, in order."""
        out, self._outbox = self._outbox, []
        return out

    def _send(self, worker: int, message: dict[str, Any]) -> None:
        self._outbox.append((worker, message))

    # -- events ---------------------------------------------------------------------------------------
    def received(self, worker: int, message: dict[str, Any]) -> None:
        op = message.get("op")
        current = self.round
        if op == "hello":
            self.connected.add(worker)
            self._send(worker, self.pins())
        elif op == "propose":
            self._queue.append((worker, int(message["id"]), message))
            self._next()
        elif op == "serving":
            self._serving(worker, message)
        elif current is not None and message.get("round") == current.id:
            if op == "staged" and current.phase == "prepare":
                current.waiting.discard(worker)
                self._advance()
            elif op == "failed" and current.phase == "prepare" and worker in current.participants:
                self._abort(f"worker {worker}: {message.get('error', 'failed')}", message)
            elif op == "swapped" and current.phase == "commit":
                current.swapped.add(worker)
                self._all_swapped(current)
            elif op == "done" and current.phase in ("commit", "apply"):
                current.waiting.discard(worker)
                self._advance()

    def left(self, worker: int) -> None:
        """``worker`` died (or closed its channel): it leaves any round; its proposals get no answer."""
        self.connected.discard(worker)
        self._queue = deque(item for item in self._queue if item[0] != worker)
        current = self.round
        if current is None:
            return
        current.participants.discard(worker)
        current.waiting.discard(worker)
        if current.proposer == worker:
            current.proposer = None
        if current.phase == "commit":
            self._all_swapped(current)
        if current.phase == "prepare" and not current.participants:
            self._abort("no worker is left to load it", {})
        else:
            self._advance()

    def tick(self) -> None:
        """Time passes: a prepare or a commit that waits too long ends."""
        current = self.round
        if current is None:
            return
        now = self.clock()
        if current.phase == "prepare" and now - current.started > self.prepare_timeout_s:
            self._abort(
                f"worker(s) {sorted(current.waiting)} did not load it within {self.prepare_timeout_s:.0f} s",
                {},
            )
        elif (
            current.phase != "prepare" and now - (current.committed_at or current.started) > COMMIT_TIMEOUT_S
        ):
            log.error(
                "round %d: worker(s) %s did not confirm it; going on", current.id, sorted(current.waiting)
            )
            current.waiting.clear()
            self._advance()

    @property
    def prepare_timeout_s(self) -> float:
        return max(PREPARE_MIN_S, 3 * self.slowest_s)

    def pins(self) -> dict[str, Any]:
        """The committed state, for a worker that starts."""
        return {
            "op": "pins",
            "models": {name: dataclasses.asdict(entry) for name, entry in self.entries.items()},
            "removed": sorted(self.removed),
        }

    # -- rounds ---------------------------------------------------------------------------------------
    def _next(self) -> None:
        while self.round is None and self._queue:
            worker, request, proposal = self._queue.popleft()
            action, model = proposal["action"], proposal["model"]
            entry = self.entries.get(model)
            ref = proposal.get("ref")
            if (
                action == "load"
                and proposal.get("reason") == "reload"
                and entry is not None
                and not entry.unloaded
                and entry.ref is not None
                and ref is not None
                and entry.ref.get("source") == ref.get("source")
            ):  # a second proposal of what the last round committed (a webhook and a poll)
                self._count(action, "unchanged")
                self._send(worker, {"op": "result", "id": request, "ok": True, "outcome": "unchanged"})
                continue
            participants = set(self.connected)
            phase = "prepare" if action in STAGED_ACTIONS else "apply"
            current = Round(
                next(self._ids),
                proposal,
                worker,
                request,
                participants,
                set(participants),
                phase,
                self.clock(),
            )
            self.round = current
            body = {k: proposal.get(k) for k in ("action", "model", "uri", "ref", "reason")}
            if phase == "apply":
                if action == "remove":
                    self.entries.pop(model, None)
                    self.removed.add(model)
                elif entry is not None:
                    entry.unloaded = True
            log.info(
                "round %d: %s %s%s on worker(s) %s", current.id, action, model,
                f" v{ref['version']}" if ref else "", sorted(participants),
            )  # fmt: skip
            for w in sorted(participants):
                self._send(w, {"op": phase, "round": current.id, **body})
            self._advance()

    def _advance(self) -> None:
        current = self.round
        if current is None or current.waiting:
            return
        if current.phase == "prepare":
            self._commit(current)
        else:
            self._finish(current)

    def _commit(self, current: Round) -> None:
        proposal = current.proposal
        model, ref = proposal["model"], proposal.get("ref")
        now = self.clock()
        self.slowest_s = max(self.slowest_s, now - current.started)
        current.phase, current.committed_at = "commit", now
        self.entries[model] = Entry(proposal.get("uri") or "", ref)
        self.removed.discard(model)
        current.waiting = set(current.participants)
        for w in sorted(current.participants):
            self._send(w, {"op": "commit", "round": current.id})
        for w in sorted(self.connected - current.participants):  # joined while it prepared
            self._send(w, {"op": "apply", "round": None, "action": "load", "model": model,
                           "uri": proposal.get("uri"), "ref": ref, "reason": "sync"})  # fmt: skip

    def _all_swapped(self, current: Round) -> None:
        if current.swapped_at is None and current.participants <= current.swapped:
            current.swapped_at = self.clock()

    def _finish(self, current: Round) -> None:
        action = current.proposal["action"]
        if current.phase == "commit":
            took = (current.swapped_at or self.clock()) - current.committed_at
            self.commit_seconds.append(took)
            if self.metrics is not None:
                self.metrics.swap_commit.observe(took)
            log.info("round %d committed: every worker swapped within %.1f ms of the commit", current.id,
                     took * 1000)  # fmt: skip
        else:
            log.info("round %d applied on every worker", current.id)
        self._count(action, "committed")
        self._reply(current, {"ok": True, "outcome": "committed"})
        self.round = None
        self._next()

    def _abort(self, error: str, failure: dict[str, Any]) -> None:
        current = self.round
        assert current is not None
        for w in sorted(current.participants):
            self._send(w, {"op": "abort", "round": current.id, "error": error})
        log.error("round %d aborted, every worker keeps what it served: %s", current.id, error)
        self._count(current.proposal["action"], "rejected")
        details = failure.get("details") or {}
        result = {"ok": False, "outcome": "rejected", "error": error, "kind": failure.get("kind")}
        self._reply(current, result | {"details": details})
        self.round = None
        self._next()

    def _reply(self, current: Round, result: dict[str, Any]) -> None:
        if current.proposer is not None and current.request is not None:
            self._send(current.proposer, {"op": "result", "id": current.request, **result})

    def _count(self, action: str, result: str) -> None:
        if self.metrics is not None:
            self.metrics.swap_rounds.labels(action, result).inc()

    def _serving(self, worker: int, message: dict[str, Any]) -> None:
        """A worker loaded a version on its own: the first report of a model is committed; a later one
        that differs from the committed version is corrected (unless a round changes that model now)."""
        model, ref = message["model"], message.get("ref")
        self.slowest_s = max(self.slowest_s, float(message.get("seconds") or 0.0))
        if model in self.removed:
            return
        entry = self.entries.get(model)
        if entry is None or entry.ref is None:
            self.entries[model] = Entry(message.get("uri") or "", ref)
            return
        if ref is not None and entry.ref.get("source") == ref.get("source"):
            entry.unloaded = False
            return
        current = self.round
        if current is not None and current.proposal["model"] == model:
            return
        log.info("worker %d serves %s v%s, the committed version is v%s: it loads that one", worker, model,
                 (ref or {}).get("version"), entry.ref.get("version"))  # fmt: skip
        self._send(worker, {"op": "apply", "round": None, "action": "load", "model": model, "uri": entry.uri,
                            "ref": entry.ref, "reason": "sync"})  # fmt: skip


# -- the worker's side -----------------------------------------------------------------------------------
def channel() -> tuple[socket.socket, int] | None:
    """In a worker the supervisor started: its channel and its index; elsewhere ``None``."""
    fd = os.environ.get(CHANNEL_ENV)
    if not fd:
        return None
    return socket.socket(fileno=int(fd)), int(os.environ.get(INDEX_ENV, "0"))


def ref_dict(ref: ModelRef) -> dict[str, Any]:
    return dataclasses.asdict(ref)


def ref_of(data: dict[str, Any] | None) -> ModelRef | None:
    from service.registry import ModelRef

    return None if data is None else ModelRef(**data)


class SwapClient:
    """A worker's end of the channel: proposes rounds for this worker's coordinated changes and takes
    part in every round (``ModelSet.coordinator`` is this object)."""

    def __init__(self, sock: socket.socket, index: int, models: ModelSet, registry: ModelRegistry) -> None:
        self.index = index
        self._sock, self._models, self._registry = sock, models, registry
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._decisions: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pins: asyncio.Future[dict[str, Any]] | None = None
        self._reading: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    @property
    def leader(self) -> bool:
        """Whether this worker follows the aliases (worker 0)."""
        return self.index == 0

    async def connect(self) -> None:
        """Say hello and apply the committed state to the models before they load."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._pins = asyncio.get_running_loop().create_future()
        self._reading = asyncio.create_task(self._read(reader), name="swap-channel")
        self._write({"op": "hello", "pid": os.getpid()})
        pins = await self._pins
        self._models.apply_pins(
            {
                name: (entry["uri"], ref_of(entry["ref"]), entry["unloaded"])
                for name, entry in pins["models"].items()
            },
            set(pins["removed"]),
        )

    async def close(self) -> None:
        self.closed = True
        tasks = [t for t in (self._reading, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
        self._fail_waiting("the worker is stopping")

    # -- proposing ------------------------------------------------------------------------------------
    async def change(
        self,
        action: str,
        name: str,
        uri: str | None = None,
        ref: ModelRef | None = None,
        reason: str = "admin",
    ) -> None:
        """Propose a round and wait for its end; raises the error of the worker that rejected it."""
        from service.errors import FerryError, ModelLoadError, NotReady

        if action in STAGED_ACTIONS and ref is None:  # resolved once, here: every worker loads that version
            ref = await asyncio.to_thread(self._registry.resolve, uri or self._models.find(name).spec.uri)
        if self.closed or self._writer is None:
            raise NotReady("the worker is stopping")
        request = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request] = future
        self._write({"op": "propose", "id": request, "action": action, "model": name, "uri": uri,
                     "ref": ref_dict(ref) if ref is not None else None, "reason": reason})  # fmt: skip
        try:
            result = await asyncio.shield(future)
        finally:
            self._pending.pop(request, None)
        if result.get("ok"):
            return
        import service.errors as errors

        kind = getattr(errors, str(result.get("kind")), None)
        message = str(result.get("error", "rejected"))
        if isinstance(kind, type) and issubclass(kind, FerryError):
            raise kind(message, **(result.get("details") or {}))
        raise ModelLoadError(f"model {name}: not swapped on every worker: {message}")

    def report(self, name: str, uri: str, ref: ModelRef, seconds: float) -> None:
        """This worker loaded ``ref`` on its own (start-up, first request, a correction) in ``seconds``."""
        if not self.closed and self._writer is not None:
            self._write(
                {"op": "serving", "model": name, "uri": uri, "ref": ref_dict(ref), "seconds": seconds}
            )

    # -- taking part ----------------------------------------------------------------------------------
    def _write(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self._dispatch(json.loads(line))
        except (ConnectionError, json.JSONDecodeError) as exc:
            log.error("worker %d: the supervisor's channel failed: %r", self.index, exc)
        if not self.closed:
            log.warning("worker %d: the supervisor's channel closed", self.index)
        self._fail_waiting("the supervisor is gone")

    def _dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "pins" and self._pins is not None and not self._pins.done():
            self._pins.set_result(message)
        elif op == "result":
            future = self._pending.get(int(message["id"]))
            if future is not None and not future.done():
                future.set_result(message)
        elif op in ("commit", "abort"):
            decision = self._decisions.get(int(message["round"]))
            if decision is not None and not decision.done():
                decision.set_result(message)
        elif op == "prepare":
            self._spawn(self._prepare(message))
        elif op == "apply":
            self._spawn(self._apply(message))

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_waiting(self, why: str) -> None:
        for future in (*self._pending.values(), *self._decisions.values()):
            if not future.done():
                future.set_result({"op": "abort", "ok": False, "error": why, "kind": "NotReady"})
        if self._pins is not None and not self._pins.done():
            self._pins.set_result({"op": "pins", "models": {}, "removed": []})

    async def _prepare(self, message: dict[str, Any]) -> None:
        from service.errors import FerryError, ModelLoadError

        round_id, name = int(message["round"]), message["model"]
        decided: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._decisions[round_id] = decided
        staged = committed = False

        async def gate() -> None:
            nonlocal staged, committed
            staged = True
            self._write({"op": "staged", "round": round_id})
            decision = await decided
            if decision["op"] != "commit":
                raise ModelLoadError(f"model {name}: not swapped: {decision.get('error')}")
            committed = True
            # ModelSet swaps right after its gate returns, with no await in between: "swapped" goes out
            # in the same turn of the event loop as the swap; "done" once the old version is retired
            self._write({"op": "swapped", "round": round_id})

        ref = ref_of(message.get("ref"))
        try:
            if message["action"] == "add" or name not in {s.name for s in self._models.slots()}:
                await self._models.add(name, message["uri"], message["reason"], ref=ref, gate=gate)
            else:
                await self._models.load(name, message.get("uri"), ref, reason=message["reason"], gate=gate)
            if not staged:  # it joined a load of that version already in progress: it serves it now
                self._write({"op": "staged", "round": round_id})
                committed = (await decided)["op"] == "commit"
                if committed:
                    self._write({"op": "swapped", "round": round_id})
        except FerryError as exc:
            if not staged:
                details = {k: v for k, v in exc.details.items() if isinstance(v, str | int | float | bool)}
                self._write({"op": "failed", "round": round_id, "error": exc.message,
                             "kind": type(exc).__name__, "details": details})  # fmt: skip
            return
        except Exception as exc:
            log.exception("worker %d: round %d failed", self.index, round_id)
            if not staged:
                self._write({"op": "failed", "round": round_id, "error": repr(exc)})
            return
        finally:
            self._decisions.pop(round_id, None)
            if committed:
                self._write({"op": "done", "round": round_id})

    async def _apply(self, message: dict[str, Any]) -> None:
        from service.errors import FerryError

        action, name = message["action"], message["model"]
        try:
            if action == "remove":
                await self._models.remove(name, message.get("reason") or "admin", local=True)
            elif action == "unload":
                await self._models.unload(name, message.get("reason") or "repository", local=True)
            elif action == "load":
                ref = ref_of(message.get("ref"))
                if name in {s.name for s in self._models.slots()}:
                    await self._models.load(name, message.get("uri") or None, ref, reason="sync")
                else:
                    await self._models.add(name, message["uri"], "sync", ref=ref)
        except FerryError as exc:
            log.error("worker %d: %s of %s failed: %s", self.index, action, name, exc.message)
        except Exception:
            log.exception("worker %d: %s of %s failed", self.index, action, name)
        finally:
            if message.get("round") is not None:
                self._write({"op": "done", "round": message["round"]})
