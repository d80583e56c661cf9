"""Dynamic batching: coalesce concurrent requests into one model call.

A ``Batcher`` owns a queue bounded in rows and one worker thread that runs the model. When the model is
idle a request runs at once; while a batch computes, new requests queue, and the next batch takes all of
them up to ``max_rows`` rows (optionally waiting ``max_wait_s`` for more). The worker takes its next
batch itself the moment the model is free, so the model never waits for the event loop (which may be
busy parsing a large body); the only hop back is one ``call_soon_threadsafe`` per batch that hands the
results to the loop. Results are split back by row counts. Only requests with equal parameters and the same
inputs share a batch (a model call takes one set; a table may leave out an optional column). A failing
batch of several requests runs each alone, so only the requests at fault fail. A request with more
rows than ``max_rows`` runs alone. A request that gives up (deadline, cancellation) leaves the queue at
once; one whose ``gone`` probe says nobody waits any more (its client hung up) is dropped when the worker
reaches it, so queued work of departed clients never reaches the model. The batcher knows no models, no
HTTP and no metrics library.

A cheap model answers a lone request inline, on the event loop, without the two thread hops (the loop
wakes the worker, the worker wakes the loop; on a busy machine each waits for a core): when
``inline_max_s`` is set, the queue is empty, no batch computes, and the model's measured compute time
(an EWMA over its calls, scaled to the request's rows) is below ``inline_max_s``. Such a request first
claims the model and yields the loop once, so the requests that arrived with it (a burst of load) reach
the queue; the worker leaves them there while the claim stands. If any came, the claimant joins them at
the head of the queue and they run as one batch, in arrival order: under load, batching is as before.
If none came, the claimant runs inline. Nothing can be ahead of it, and nothing joins it while it runs
(requests arrive on the loop, which it holds), so the guarantees above hold: it starts only if its
deadline has not passed and its ``gone`` probe says somebody waits, fails alone as a lone batch would,
and an answer later than its deadline is a deadline error. Until the model's first call is measured
(the warm-up's, on the worker), nothing runs inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.errors import (
    ClientGone,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    NotReady,
    Overloaded,
)

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
Params = Mapping[str, Any]
RunFn = Callable[[Arrays, Params | None], dict[str, np.ndarray]]
"""Runs the model on a batch of inputs with the parameters every request of the batch sent."""
Probe = Callable[[], bool]
"""True once nobody waits for a request's answer; called on the worker thread, so it must only read."""


class BatchObserver(Protocol):
    """Receives what a batcher does, for metrics."""

    def batch(self, rows: int, compute_s: float) -> None: ...

    def queue(self, rows: int) -> None: ...

    def failed(self, requests: int) -> None: ...

    def abandoned(self, requests: int) -> None: ...


@dataclass(slots=True)
class BatchResult:
    """One request's share of a batch."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float


@dataclass(slots=True, eq=False)  # compared by identity: a request leaves the queue by itself
class _Pending:
    inputs: Arrays
    rows: int
    future: asyncio.Future[BatchResult]
    enqueued: float
    params: Params | None = None
    gone: Probe | None = None


class Batcher:
    """Queue plus worker thread for one model version."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_rows: int,
        queue_rows: int,
        max_wait_s: float = 0.0,
        enabled: bool = True,
        observer: BatchObserver | None = None,
        name: str = "model",
        inline_max_s: float = 0.0,
    ) -> None:
        self._run_fn = run
        self._max_rows = max_rows if enabled else 1
        self._queue_rows = queue_rows
        self._max_wait_s = max_wait_s if enabled else 0.0
        self._enabled = enabled
        self._observer = observer
        self._loop = asyncio.get_running_loop()
        # The queue, its row count and the in-flight count are shared with the worker: guarded by the
        # lock; the condition wakes the worker when rows arrive or the batcher stops.
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queue: deque[_Pending] = deque()
        self._rows = 0
        self._inflight = 0
        self._closing = False
        self._stopped = False
        self._claimed = False  # a lone request decides whether it runs inline: the worker waits
        # Inline runs gather nothing: off when the operator asked batches to wait for more rows.
        self._inline_max_s = inline_max_s if not self._max_wait_s else 0.0
        self._call_s: float | None = None  # EWMA of a model call's compute time (seconds)
        self._call_rows = 1.0  # EWMA of a model call's rows
        self.batches = 0
        """Model calls made so far (for tests and the benchmark)."""
        self.inline = 0
        """Requests answered inline on the event loop so far (for tests and the benchmark)."""
        self._thread = threading.Thread(target=self._work, name=f"ferry-{name}", daemon=True)
        self._thread.start()

    @property
    def queued_rows(self) -> int:
        return self._rows

    @property
    def closing(self) -> bool:
        """True once ``close`` began: new requests are refused (``NotReady``), queued ones drain."""
        return self._closing

    async def submit(
        self,
        inputs: Arrays,
        rows: int,
        timeout_s: float,
        params: Params | None = None,
        gone: Probe | None = None,
    ) -> BatchResult:
        """Queue ``rows`` rows and wait for their outputs, at most ``timeout_s`` seconds.

        ``gone``, when given, tells whether anybody still waits: the worker checks it before the rows
        join a batch, and drops them (``ClientGone``) when it says no.
        """
        if self._closing:
            raise NotReady("model is shutting down")
        head = False  # a claimant that found company: it joins the queue ahead of those that came after it
        if (
            self._inline_max_s
            and not self._claimed
            and not self._queue
            and not self._inflight
            and self._cheap(rows)
        ):
            with self._lock:
                self._claimed = True
            try:
                await asyncio.sleep(0)  # the requests that arrived with this one reach the queue
            except BaseException:
                self._unclaim()
                raise
            if self.closing:  # close began while it yielded
                self._unclaim()
                raise NotReady("model is shutting down")
            if not self._queue and not self._inflight:
                self._claimed = False  # nothing waits for the worker, and nothing can arrive meanwhile
                return self._run_inline(inputs, rows, timeout_s, params, gone)
            head = True
        future: asyncio.Future[BatchResult] = self._loop.create_future()
        with self._lock:
            if head:
                self._claimed = False
            if self._rows and self._rows + rows > self._queue_rows:
                if head:
                    self._arrived.notify()  # the requests queued during the claim run without this one
                raise Overloaded(
                    f"queue full ({self._rows} rows waiting, limit {self._queue_rows}); retry shortly",
                    queued_rows=self._rows,
                )
            pending = _Pending(inputs, rows, future, time.perf_counter(), params or None, gone)
            if head:
                self._queue.appendleft(pending)
            else:
                self._queue.append(pending)
            self._rows += rows
            queued = self._rows
            self._arrived.notify()
        if self._observer:
            self._observer.queue(queued)
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            self._withdraw(pending)
            raise DeadlineExceeded(f"no result within the {timeout_s * 1000:.0f} ms deadline") from None
        except asyncio.CancelledError:
            self._withdraw(pending)
            raise

    def _unclaim(self) -> None:
        """Give up a claim; the worker takes what queued meanwhile."""
        with self._lock:
            self._claimed = False
            self._arrived.notify()

    def _cheap(self, rows: int) -> bool:
        """Whether ``rows`` rows are expected to compute within ``inline_max_s`` (unknown: no)."""
        call_s = self._call_s
        if call_s is None or rows > self._max_rows:
            return False
        return call_s * max(1.0, rows / self._call_rows) <= self._inline_max_s

    def _run_inline(
        self, inputs: Arrays, rows: int, timeout_s: float, params: Params | None, gone: Probe | None
    ) -> BatchResult:
        """Run one request on the event loop's thread, as the worker would run it alone (see the module
        docstring)."""
        if timeout_s <= 0:
            raise DeadlineExceeded(f"no result within the {timeout_s * 1000:.0f} ms deadline")
        if gone is not None and gone():
            if self._observer:
                self._observer.abandoned(1)
            raise ClientGone("the client hung up before its rows reached the model")
        self.inline += 1
        outcome = self._call_one(inputs, rows, params or None)
        if isinstance(outcome, Exception):
            raise self._error(outcome, 1) from None
        outputs, _start, compute_s = outcome
        self.batches += 1
        self._measured(rows, compute_s)
        if self._observer:
            self._observer.batch(rows, compute_s)
        if compute_s > timeout_s:
            raise DeadlineExceeded(f"no result within the {timeout_s * 1000:.0f} ms deadline")
        return BatchResult(outputs, 0.0, compute_s)

    def _measured(self, rows: int, compute_s: float) -> None:
        """Fold one model call into the compute-time EWMA that decides inline runs."""
        if self._call_s is None:
            self._call_s, self._call_rows = compute_s, float(rows)
        else:
            self._call_s += _EWMA * (compute_s - self._call_s)
            self._call_rows += _EWMA * (rows - self._call_rows)

    def _withdraw(self, pending: _Pending) -> None:
        """Take a request that gave up out of the queue at once, so its rows stop counting against the limit.

        The worker may already have taken it (it then runs, and its result is dropped); the worker also
        skips requests whose future is done, should one still be queued.
        """
        with self._lock:
            try:
                self._queue.remove(pending)
            except ValueError:
                return
            self._rows -= pending.rows
            queued = self._rows
        if self._observer:
            self._observer.queue(queued)

    async def close(self, drain: bool = True) -> None:
        """Refuse new requests; finish (``drain``) or fail the queued ones; stop the worker."""
        self._closing = True
        if drain:
            # Polled: drains are rare, and the worker also empties the queue of expired requests.
            while self._queue or self._inflight:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        with self._lock:
            self._stopped = True
            left = list(self._queue)
            self._queue.clear()
            self._rows = 0
            self._arrived.notify_all()
        for pending in left:
            if not pending.future.done():
                pending.future.set_exception(NotReady("model was unloaded"))
        # The worker finishes the batch it is running, if any (its results go to the loop as usual).
        await asyncio.to_thread(self._thread.join)

    # -- the worker thread -----------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._arrived:
                while (not self._queue or self._claimed) and not self._stopped:
                    self._arrived.wait()
                if self._stopped:
                    return
                if self._max_wait_s and self._rows < self._max_rows:
                    deadline = self._queue[0].enqueued + self._max_wait_s
                    while self._rows < self._max_rows and not self._stopped:
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        self._arrived.wait(remaining)
                dropped: list[_Pending] = []
                batch = self._take(dropped)
                queued = self._rows
                if batch:
                    self._inflight += 1
            if dropped:
                self._to_loop(self._abandon, dropped)
            if self._observer:
                self._observer.queue(queued)
            if batch:
                self._run(batch)

    def _take(self, dropped: list[_Pending]) -> list[_Pending]:
        """The next batch from the head of the queue (lock held); requests nobody waits for go to
        ``dropped``."""
        batch: list[_Pending] = []
        rows = 0
        queue = self._queue
        while queue:
            head = queue[0]
            if head.future.done():  # timed out or cancelled, and not yet withdrawn
                queue.popleft()
                self._rows -= head.rows
                continue
            if head.gone is not None and head.gone():
                queue.popleft()
                self._rows -= head.rows
                dropped.append(head)
                continue
            if batch and (
                rows + head.rows > self._max_rows
                or head.params != batch[0].params
                or head.inputs.keys() != batch[0].inputs.keys()  # a table without an optional column
            ):
                break
            queue.popleft()
            self._rows -= head.rows
            batch.append(head)
            rows += head.rows
            if rows >= self._max_rows:
                break
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        outcome = self._call(batch)
        if isinstance(outcome, Exception) and len(batch) > 1 and not _shared(outcome):
            # One request's input can fail a whole batch (a model that checks its input itself, or
            # raises on a value it cannot take): each request runs alone, so only the ones at fault fail.
            log.warning("a batch of %d requests failed (%r); running each alone", len(batch), outcome)
            with self._lock:
                self._inflight += len(batch) - 1  # each request is delivered (or failed) on its own
            for p in batch:
                self._finish([p], self._call([p]) if not p.future.done() else outcome)
            return
        self._finish(batch, outcome)

    def _call(self, batch: list[_Pending]) -> tuple[dict[str, np.ndarray], float, float] | Exception:
        """The model's outputs for a batch with when it started and how long it took, or its error."""
        if len(batch) == 1:
            return self._call_one(batch[0].inputs, batch[0].rows, batch[0].params)
        try:
            inputs = _concat([p.inputs for p in batch])
        except Exception as exc:
            return exc
        return self._call_one(inputs, sum(p.rows for p in batch), batch[0].params)

    def _call_one(
        self, inputs: Arrays, rows: int, params: Params | None
    ) -> tuple[dict[str, np.ndarray], float, float] | Exception:
        """The model's outputs for ``rows`` rows with when it started and how long it took, or its error."""
        start = time.perf_counter()
        try:
            outputs = self._run_fn(inputs, params)
            compute_s = time.perf_counter() - start
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != rows:
                    raise InferenceFailed(
                        f"model output {name!r} has shape {value.shape}, expected {rows} rows"
                    )
        except Exception as exc:
            return exc
        return outputs, start, compute_s

    def _finish(
        self, batch: list[_Pending], outcome: tuple[dict[str, np.ndarray], float, float] | Exception
    ) -> None:
        if isinstance(outcome, Exception):
            self._to_loop(self._fail, batch, outcome)
            return
        outputs, start, compute_s = outcome
        self.batches += 1
        rows = sum(p.rows for p in batch)
        self._measured(rows, compute_s)
        if self._observer:
            self._observer.batch(rows, compute_s)
        self._to_loop(self._deliver, batch, outputs, start, compute_s)

    def _to_loop(self, callback: Callable[..., None], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)

    # -- back on the event loop ------------------------------------------------------------------------
    def _deliver(
        self, batch: list[_Pending], outputs: dict[str, np.ndarray], start: float, compute_s: float
    ) -> None:
        with self._lock:
            self._inflight -= 1
        offset = 0
        for p in batch:
            if not p.future.done():
                end = offset + p.rows
                part = {k: v[offset:end] for k, v in outputs.items()} if len(batch) > 1 else outputs
                p.future.set_result(BatchResult(part, start - p.enqueued, compute_s))
            offset += p.rows

    def _abandon(self, dropped: list[_Pending]) -> None:
        for p in dropped:
            if not p.future.done():
                p.future.set_exception(ClientGone("the client hung up before its rows reached the model"))
        if self._observer:
            self._observer.abandoned(len(dropped))

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        with self._lock:
            self._inflight -= 1
        error = self._error(exc, len(batch))
        for p in batch:
            if not p.future.done():
                p.future.set_exception(error)

    def _error(self, exc: Exception, requests: int) -> Exception:
        """What the requests of a failed model call get: an ``InvalidInput`` as it is (the parameters
        they all sent), anything else logged, counted and an ``InferenceFailed``."""
        if isinstance(exc, InvalidInput):
            return exc
        log.error("model call failed for a batch of %d request(s): %r", requests, exc, exc_info=exc)
        if self._observer:
            self._observer.failed(requests)
        return exc if isinstance(exc, InferenceFailed) else InferenceFailed("the model failed on this batch")


_EWMA = 0.2
"""Weight of the newest model call in the compute-time average."""


def _shared(exc: Exception) -> bool:
    """Whether an error is every request's in the batch: the parameters they all sent."""
    return isinstance(exc, InvalidInput) and exc.details.get("field") == "params"


def _concat(parts: list[Arrays]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
