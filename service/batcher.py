"""Dynamic batching: coalesce concurrent requests into one model call.

A ``Batcher`` owns a queue bounded in rows and one consumer task. When the model is idle a request runs
at once; while a batch computes, new requests queue, and the next batch takes all of them up to
``max_rows`` rows (optionally waiting ``max_wait_s`` for more). The model runs in one worker thread, so
there is one thread hop per batch, not per request, and the event loop keeps accepting requests.
Results are split back by row counts. A failing batch fails only its own requests. A request with more
rows than ``max_rows`` runs alone. The batcher knows no models, no HTTP and no metrics library.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded

log = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]
RunFn = Callable[[Arrays], dict[str, np.ndarray]]


class BatchObserver(Protocol):
    """Receives what a batcher does, for metrics."""

    def batch(self, rows: int, compute_s: float) -> None: ...

    def queue(self, rows: int) -> None: ...

    def failed(self, requests: int) -> None: ...


@dataclass(slots=True)
class BatchResult:
    """One request's share of a batch."""

    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float


@dataclass(slots=True)
class _Pending:
    inputs: Arrays
    rows: int
    future: asyncio.Future[BatchResult]
    enqueued: float


class Batcher:
    """Queue plus consumer for one model version."""

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
    ) -> None:
        self._run_fn = run
        self._max_rows = max_rows if enabled else 1
        self._queue_rows = queue_rows
        self._max_wait_s = max_wait_s if enabled else 0.0
        self._enabled = enabled
        self._observer = observer
        self._queue: deque[_Pending] = deque()
        self._rows = 0
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ferry-{name}")
        self._task = asyncio.get_running_loop().create_task(self._consume(), name=f"batcher-{name}")
        self.batches = 0
        """Model calls made so far (for tests and the benchmark)."""

    @property
    def queued_rows(self) -> int:
        return self._rows

    async def submit(self, inputs: Arrays, rows: int, timeout_s: float) -> BatchResult:
        """Queue ``rows`` rows and wait for their outputs, at most ``timeout_s`` seconds."""
        if self._closing:
            raise NotReady("model is shutting down")
        if self._rows and self._rows + rows > self._queue_rows:
            raise Overloaded(
                f"queue full ({self._rows} rows waiting, limit {self._queue_rows}); retry shortly",
                queued_rows=self._rows,
            )
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(inputs, rows, future, time.perf_counter()))
        self._rows += rows
        if self._observer:
            self._observer.queue(self._rows)
        self._wakeup.set()
        if self._rows >= self._max_rows:
            self._full.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise DeadlineExceeded(f"no result within the {timeout_s * 1000:.0f} ms deadline") from None

    async def close(self, drain: bool = True) -> None:
        """Refuse new requests; finish (``drain``) or fail the queued ones; stop the worker."""
        self._closing = True
        if drain:
            while self._queue:
                self._wakeup.set()
                await asyncio.sleep(0.005)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(NotReady("model was unloaded"))
        self._queue.clear()
        self._executor.shutdown(wait=True)

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._max_wait_s and self._rows < self._max_rows:
                deadline = self._queue[0].enqueued + self._max_wait_s
                remaining = deadline - time.perf_counter()
                if remaining > 0:
                    self._full.clear()
                    try:
                        async with asyncio.timeout(remaining):
                            await self._full.wait()
                    except TimeoutError:
                        pass
            batch = self._take()
            if batch:
                await self._run(loop, batch)

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        queue = self._queue
        while queue:
            head = queue[0]
            if head.future.done():  # timed out or cancelled while waiting
                queue.popleft()
                self._rows -= head.rows
                continue
            if batch and rows + head.rows > self._max_rows:
                break
            queue.popleft()
            self._rows -= head.rows
            batch.append(head)
            rows += head.rows
            if rows >= self._max_rows:
                break
        if self._observer:
            self._observer.queue(self._rows)
        return batch

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        rows = sum(p.rows for p in batch)
        try:
            inputs = batch[0].inputs if len(batch) == 1 else _concat([p.inputs for p in batch])
            start = time.perf_counter()
            outputs = await loop.run_in_executor(self._executor, self._run_fn, inputs)
            compute_s = time.perf_counter() - start
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != rows:
                    raise InferenceFailed(
                        f"model output {name!r} has shape {value.shape}, expected {rows} rows"
                    )
        except Exception as exc:
            self._fail(batch, exc)
            return
        self.batches += 1
        if self._observer:
            self._observer.batch(rows, compute_s)
        offset = 0
        for p in batch:
            if not p.future.done():
                end = offset + p.rows
                part = {k: v[offset:end] for k, v in outputs.items()} if len(batch) > 1 else outputs
                p.future.set_result(BatchResult(part, start - p.enqueued, compute_s))
            offset += p.rows

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        log.error("model call failed for a batch of %d request(s): %r", len(batch), exc, exc_info=exc)
        if self._observer:
            self._observer.failed(len(batch))
        error = exc if isinstance(exc, InferenceFailed) else InferenceFailed("the model failed on this batch")
        for p in batch:
            if not p.future.done():
                p.future.set_exception(error)


def _concat(parts: list[Arrays]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
