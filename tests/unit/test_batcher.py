"""Batcher: coalescing, limits, deadlines, cancellation and failures, synchronised with events (no sleeps)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from conftest import wait_until
from service.batcher import Batcher
from service.errors import (
    ClientGone,
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    NotReady,
    Overloaded,
)


class GatedModel:
    """Doubles its input; each call blocks until the test opens the gate, and records batch sizes."""

    def __init__(self, gated: bool = True) -> None:
        self.calls: list[int] = []
        self.params: list[Mapping[str, Any] | None] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(
        self, inputs: Mapping[str, np.ndarray], params: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.calls.append(x.shape[0])
        self.params.append(params)
        self.entered.set()
        self.gate.wait(timeout=10)
        return {"y": x * 2}


def rows(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array([[v] for v in values], dtype=np.float32)}


async def wait_entered(model: GatedModel) -> None:
    assert await asyncio.to_thread(model.entered.wait, 10)
    model.entered.clear()


class Counting:
    """A BatchObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.failed_batches: list[int] = []
        self.abandoned_requests = 0

    def batch(self, rows: int, compute_s: float) -> None:
        self.batches.append(rows)

    def queue(self, rows: int) -> None:
        pass

    def failed(self, requests: int) -> None:
        self.failed_batches.append(requests)

    def abandoned(self, requests: int) -> None:
        self.abandoned_requests += requests


@pytest.mark.asyncio
async def test_idle_model_runs_a_lone_request_at_once() -> None:
    model = GatedModel(gated=False)
    batcher = Batcher(model, max_rows=8, queue_rows=64, max_wait_s=0)
    result = await batcher.submit(rows(1.5), 1, timeout_s=5)
    assert result.outputs["y"].tolist() == [[3.0]]
    assert model.calls == [1]
    await batcher.close()


@pytest.mark.asyncio
async def test_requests_queued_while_busy_share_one_batch_and_get_their_own_rows() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=64, queue_rows=64)
    first = asyncio.create_task(batcher.submit(rows(1), 1, 5))
    await wait_entered(model)  # the model is busy with the first request
    others = [asyncio.create_task(batcher.submit(rows(v, v + 0.5), 2, 5)) for v in (10, 20, 30)]
    await asyncio.sleep(0)  # let the three enqueue
    model.gate.set()
    assert (await first).outputs["y"].tolist() == [[2.0]]
    results = [await t for t in others]
    assert [r.outputs["y"].ravel().tolist() for r in results] == [[20, 21], [40, 41], [60, 61]]
    assert model.calls == [1, 6]
    assert batcher.batches == 2
    await batcher.close()


@pytest.mark.asyncio
async def test_max_rows_bounds_a_batch() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=4, queue_rows=64)
    first = asyncio.create_task(batcher.submit(rows(0), 1, 5))
    await wait_entered(model)
    queued = [asyncio.create_task(batcher.submit(rows(1, 2, 3), 3, 5)) for _ in range(3)]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(first, *queued)
    assert model.calls == [1, 3, 3, 3]  # 3+3 > 4: each request of 3 rows is its own batch
    await batcher.close()


@pytest.mark.asyncio
async def test_a_request_larger_than_max_rows_runs_alone_instead_of_being_refused() -> None:
    model = GatedModel(gated=False)
    batcher = Batcher(model, max_rows=2, queue_rows=64)
    result = await batcher.submit(rows(1, 2, 3, 4, 5), 5, 5)
    assert result.outputs["y"].shape == (5, 1)
    assert model.calls == [5]
    await batcher.close()


@pytest.mark.asyncio
async def test_max_wait_gathers_rows_that_arrive_within_the_window() -> None:
    model = GatedModel(gated=False)
    batcher = Batcher(model, max_rows=3, queue_rows=64, max_wait_s=30.0)
    tasks = [asyncio.create_task(batcher.submit(rows(v), 1, 60)) for v in (1, 2)]
    await asyncio.sleep(0)
    assert model.calls == []  # waiting for the window or a full batch
    tasks.append(asyncio.create_task(batcher.submit(rows(3), 1, 60)))  # fills the batch: runs now
    results = await asyncio.gather(*tasks)
    assert [r.outputs["y"].item() for r in results] == [2, 4, 6]
    assert model.calls == [3]
    await batcher.close()


@pytest.mark.asyncio
async def test_full_queue_is_overloaded_and_other_requests_still_complete() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=64, queue_rows=4)
    running = asyncio.create_task(batcher.submit(rows(1), 1, 5))
    await wait_entered(model)
    queued = asyncio.create_task(batcher.submit(rows(1, 2, 3), 3, 5))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded) as info:
        await batcher.submit(rows(1, 2), 2, 5)
    assert info.value.status == 503 and info.value.retry_after_s >= 1
    model.gate.set()
    assert (await running).outputs["y"].item() == 2
    assert (await queued).outputs["y"].shape == (3, 1)
    await batcher.close()


@pytest.mark.asyncio
async def test_deadline_passed_while_queued_is_504_and_skipped() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=64, queue_rows=64)
    running = asyncio.create_task(batcher.submit(rows(1), 1, 5))
    await wait_entered(model)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(rows(7), 1, timeout_s=0.01)
    assert batcher.queued_rows == 0  # it left the queue when it gave up, not when the worker got to it
    model.gate.set()
    await running
    await batcher.close()
    assert model.calls == [1]  # the expired request never reached the model


@pytest.mark.asyncio
async def test_requests_that_gave_up_free_their_queue_space_at_once() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=64, queue_rows=4)
    running = asyncio.create_task(batcher.submit(rows(1), 1, 5))
    await wait_entered(model)  # the model is busy: everything below waits in the queue
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(rows(1, 2, 3), 3, timeout_s=0.01)
    cancelled = asyncio.create_task(batcher.submit(rows(1), 1, 5))
    await asyncio.sleep(0)
    assert batcher.queued_rows == 1
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert batcher.queued_rows == 0
    kept = asyncio.create_task(batcher.submit(rows(1, 2, 3, 4), 4, 5))  # fits only if both left
    await asyncio.sleep(0)
    assert batcher.queued_rows == 4
    model.gate.set()
    await running
    assert (await kept).outputs["y"].shape == (4, 1)
    assert model.calls == [1, 4]
    await batcher.close()


@pytest.mark.asyncio
async def test_cancelled_waiting_request_is_dropped_without_disturbing_others() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=64, queue_rows=64)
    running = asyncio.create_task(batcher.submit(rows(1), 1, 5))
    await wait_entered(model)
    doomed = asyncio.create_task(batcher.submit(rows(100), 1, 5))
    kept = asyncio.create_task(batcher.submit(rows(5), 1, 5))
    await asyncio.sleep(0)
    doomed.cancel()
    model.gate.set()
    await running
    assert (await kept).outputs["y"].item() == 10
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert model.calls == [1, 1]
    await batcher.close()


@pytest.mark.asyncio
async def test_a_failing_batch_fails_only_its_own_requests() -> None:
    calls: list[int] = []

    def flaky(inputs: Mapping[str, np.ndarray], params: Any) -> dict[str, np.ndarray]:
        calls.append(len(inputs["x"]))
        if (inputs["x"] < 0).any():
            raise RuntimeError("boom")
        return {"y": inputs["x"] * 2}

    observer = Counting()
    batcher = Batcher(flaky, max_rows=1, queue_rows=64, observer=observer)
    bad, good = await asyncio.gather(
        batcher.submit(rows(-1), 1, 5), batcher.submit(rows(4), 1, 5), return_exceptions=True
    )
    assert isinstance(bad, InferenceFailed) and "failed" in bad.message
    assert not isinstance(good, BaseException) and good.outputs["y"].item() == 8
    assert observer.failed_batches == [1] and observer.batches == [1]
    await batcher.close()


@pytest.mark.asyncio
async def test_wrong_output_rows_fail_the_batch_with_a_clear_error() -> None:
    batcher = Batcher(lambda _, __: {"y": np.zeros((1, 1))}, max_rows=8, queue_rows=64)
    with pytest.raises(InferenceFailed, match="expected 2 rows"):
        await batcher.submit(rows(1, 2), 2, 5)
    await batcher.close()


@pytest.mark.asyncio
async def test_batching_off_runs_each_request_alone() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=64, queue_rows=64, enabled=False)
    tasks = [asyncio.create_task(batcher.submit(rows(v), 1, 5)) for v in (1, 2, 3)]
    await wait_entered(model)
    model.gate.set()
    await asyncio.gather(*tasks)
    assert model.calls == [1, 1, 1]
    await batcher.close()


@pytest.mark.asyncio
async def test_closed_batcher_refuses_new_requests() -> None:
    batcher = Batcher(GatedModel(gated=False), max_rows=8, queue_rows=64)
    await batcher.close()
    with pytest.raises(NotReady):
        await batcher.submit(rows(1), 1, 5)


@pytest.mark.asyncio
async def test_the_model_takes_its_next_batch_while_the_event_loop_is_busy() -> None:
    # Batching off: three requests are three model calls. The loop is then blocked (as while it parses a
    # large body); the worker must run all three without it, and the loop only collects the results.
    model = GatedModel(gated=False)
    batcher = Batcher(model, max_rows=64, queue_rows=64, enabled=False)
    tasks = [asyncio.create_task(batcher.submit(rows(v), 1, 5)) for v in (1, 2, 3)]
    await asyncio.sleep(0)  # the three requests queue their rows
    finished = threading.Event()
    watcher = threading.Thread(
        target=lambda: finished.set() if wait_until(lambda: batcher.batches == 3) else None
    )
    watcher.start()
    watcher.join(10)  # blocks the event loop on purpose
    assert finished.is_set() and model.calls == [1, 1, 1]
    results = await asyncio.gather(*tasks)
    assert [r.outputs["y"].tolist() for r in results] == [[[2.0]], [[4.0]], [[6.0]]]
    await batcher.close()


@pytest.mark.asyncio
async def test_drain_finishes_queued_and_running_requests() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=1, queue_rows=64)
    tasks = [asyncio.create_task(batcher.submit(rows(v), 1, 5)) for v in (1, 2)]
    await wait_entered(model)  # the first runs, the second is queued
    closing = asyncio.create_task(batcher.close(drain=True))
    await asyncio.sleep(0.05)
    assert not closing.done()
    model.gate.set()
    await closing
    assert [r.outputs["y"].tolist() for r in await asyncio.gather(*tasks)] == [[[2.0]], [[4.0]]]


@pytest.mark.asyncio
async def test_only_requests_with_equal_params_share_a_batch() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=64, queue_rows=64)
    first = asyncio.create_task(batcher.submit(rows(0), 1, 5))
    await wait_entered(model)  # the model is busy: the next four queue in this order
    queued = [
        asyncio.create_task(batcher.submit(rows(v), 1, 5, params=p))
        for v, p in ((1, {"t": 1}), (2, {"t": 1}), (3, {"t": 2}), (4, None))
    ]
    await asyncio.sleep(0)
    model.gate.set()
    await asyncio.gather(first, *queued)
    # In arrival order, a batch ends where the parameters change.
    assert model.calls == [1, 2, 1, 1]
    assert model.params == [None, {"t": 1}, {"t": 2}, None]
    await batcher.close()


@pytest.mark.asyncio
async def test_invalid_params_are_the_clients_error_not_a_failed_batch() -> None:
    def strict(inputs: Mapping[str, np.ndarray], params: Any) -> dict[str, np.ndarray]:
        raise InvalidInput("params: 't' must be an integer", field="params")

    batcher = Batcher(strict, max_rows=8, queue_rows=64)
    with pytest.raises(InvalidInput, match="must be an integer"):
        await batcher.submit(rows(1), 1, 5, params={"t": "x"})
    await batcher.close()


@pytest.mark.asyncio
async def test_queued_rows_of_a_client_that_left_are_dropped_before_the_model_runs() -> None:
    model, observer = GatedModel(), Counting()
    batcher = Batcher(model, max_rows=64, queue_rows=64, observer=observer)
    running = asyncio.create_task(batcher.submit(rows(1), 1, 5, gone=lambda: False))
    await wait_entered(model)  # busy: the two below queue
    left = [False]
    leaving = asyncio.create_task(batcher.submit(rows(2, 3), 2, 5, gone=lambda: left[0]))
    staying = asyncio.create_task(batcher.submit(rows(4), 1, 5, gone=lambda: False))
    await asyncio.sleep(0)
    left[0] = True  # that client hangs up while its rows wait
    model.gate.set()
    await running
    with pytest.raises(ClientGone) as info:
        await leaving
    assert info.value.status == 499
    assert (await staying).outputs["y"].item() == 8
    assert model.calls == [1, 1]  # the departed client's two rows never reached the model
    assert observer.abandoned_requests == 1 and batcher.queued_rows == 0
    await batcher.close()


@pytest.mark.asyncio
async def test_a_client_leaving_after_its_rows_joined_a_batch_changes_nothing() -> None:
    model = GatedModel()
    batcher = Batcher(model, max_rows=64, queue_rows=64)
    left = [False]
    running = asyncio.create_task(batcher.submit(rows(1), 1, 5, gone=lambda: left[0]))
    await wait_entered(model)
    left[0] = True  # too late: the model already computes it
    model.gate.set()
    assert (await running).outputs["y"].item() == 2
    await batcher.close()


# -- inline runs: a cheap model answers a lone request on the event loop (issue 15) ---------------------
class ThreadRecording:
    """Doubles its input and records the thread of each call; a call of value -1 raises, of -2 returns
    the wrong number of rows, and each call waits for the gate (open unless a test closes it)."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.calls: list[int] = []
        self.inputs: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, inputs: Mapping[str, np.ndarray], params: Any = None) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.threads.append(threading.get_ident())
        self.calls.append(x.shape[0])
        self.inputs.append(x.ravel().tolist())
        self.entered.set()
        self.gate.wait(timeout=10)
        if (x == -1).any():
            raise RuntimeError("boom")
        if (x == -2).any():
            return {"y": np.zeros((x.shape[0] + 1, 1), dtype=np.float32)}
        return {"y": x * 2}


async def measured(model: ThreadRecording, inline_max_s: float = 10.0, **kwargs: Any) -> Batcher:
    """A batcher with inline runs allowed below ``inline_max_s`` whose model's compute time is measured
    (one call, on the worker, as a warm-up makes it)."""
    batcher = Batcher(model, max_rows=8, queue_rows=64, inline_max_s=inline_max_s, **kwargs)
    await batcher.submit(rows(0), 1, 5)
    assert model.threads == [batcher._thread.ident]  # nothing measured yet: the worker ran it
    return batcher


@pytest.mark.asyncio
async def test_a_cheap_idle_model_answers_a_lone_request_on_the_event_loop() -> None:
    model = ThreadRecording()
    observer = Counting()
    batcher = await measured(model, observer=observer)
    for value in (1.5, 2.5):
        result = await batcher.submit(rows(value), 1, 5)
        assert result.outputs["y"].item() == value * 2
    assert model.threads[1:] == [threading.get_ident()] * 2
    assert batcher.inline == 2 and batcher.batches == 3
    assert observer.batches == [1, 1, 1]  # inline calls are reported like the worker's
    await batcher.close()


@pytest.mark.asyncio
async def test_an_expensive_model_or_a_zero_bound_never_runs_inline() -> None:
    for bound in (1e-12, 0.0):  # no call computes within a picosecond; 0 turns inline runs off
        model = ThreadRecording()
        batcher = Batcher(model, max_rows=8, queue_rows=64, inline_max_s=bound)
        for value in range(4):
            await batcher.submit(rows(value), 1, 5)
        assert set(model.threads) == {batcher._thread.ident}
        assert batcher.inline == 0 and batcher.batches == 4
        await batcher.close()


@pytest.mark.asyncio
async def test_max_wait_turns_inline_runs_off() -> None:
    model = ThreadRecording()
    batcher = Batcher(model, max_rows=1, queue_rows=64, max_wait_s=30.0, inline_max_s=10.0)
    for value in range(3):  # max_rows=1 fills each batch at once: no wait
        await batcher.submit(rows(value), 1, 5)
    assert set(model.threads) == {batcher._thread.ident} and batcher.inline == 0
    await batcher.close()


@pytest.mark.asyncio
async def test_rows_beyond_the_measured_cost_or_max_rows_go_to_the_worker() -> None:
    model = ThreadRecording()
    batcher = await measured(model)
    batcher._inline_max_s = 0.004
    # 1 ms per call of 1 row, as if measured (set here before each request: no timing in tests)
    batcher._call_s, batcher._call_rows = 0.001, 1.0
    await batcher.submit(rows(1, 2, 3, 4), 4, 5)  # 4 rows: 4 ms expected, within the bound
    batcher._call_s, batcher._call_rows = 0.001, 1.0
    await batcher.submit(rows(1, 2, 3, 4, 5), 5, 5)  # 5 ms expected: the worker
    assert model.threads[1:] == [threading.get_ident(), batcher._thread.ident]
    batcher._call_s, batcher._call_rows = 0.0, 1.0
    await batcher.submit(rows(*range(9)), 9, 5)  # more than max_rows runs alone, on the worker
    assert model.threads[-1] == batcher._thread.ident
    assert batcher.inline == 1
    await batcher.close()


@pytest.mark.asyncio
async def test_a_busy_model_queues_and_batches_as_before() -> None:
    model = ThreadRecording()
    batcher = await measured(model)
    model.gate.clear()
    model.entered.clear()
    # More rows than max_rows: the worker computes it, and the model is busy meanwhile.
    big = asyncio.create_task(batcher.submit(rows(*range(9)), 9, 5))
    assert await asyncio.to_thread(model.entered.wait, 10)
    queued = [asyncio.create_task(batcher.submit(rows(v), 1, 5)) for v in (10, 20, 30)]
    await asyncio.sleep(0)
    assert batcher.queued_rows == 3  # none ran inline beside the busy model
    model.gate.set()
    await big
    assert [(await t).outputs["y"].item() for t in queued] == [20, 40, 60]
    assert model.calls == [1, 9, 3]
    assert set(model.threads) == {batcher._thread.ident} and batcher.inline == 0
    await batcher.close()


@pytest.mark.asyncio
async def test_requests_arriving_together_at_an_idle_model_share_a_batch_in_arrival_order() -> None:
    model = ThreadRecording()
    batcher = await measured(model)
    # Four requests reach the batcher in the same turn of the loop, as a burst of connections does:
    # the first claims the model, yields once, finds the other three queued and joins them at the head.
    results = await asyncio.gather(*(batcher.submit(rows(v), 1, 5) for v in (1, 2, 3, 4)))
    assert [r.outputs["y"].item() for r in results] == [2, 4, 6, 8]
    assert model.inputs[1:] == [[1, 2, 3, 4]]  # one batch of all four, the claimant first
    assert model.threads[1] == batcher._thread.ident and batcher.inline == 0
    await batcher.close()


@pytest.mark.asyncio
async def test_a_claimant_that_is_cancelled_lets_the_queued_requests_run() -> None:
    model = ThreadRecording()
    batcher = await measured(model)
    claimant = asyncio.create_task(batcher.submit(rows(1), 1, 5))
    other = asyncio.create_task(batcher.submit(rows(2), 1, 5))
    await asyncio.sleep(0)  # the claimant claimed the model and yielded; the other queued behind it
    assert batcher._claimed
    assert batcher.queued_rows == 1 and model.calls == [1]  # the worker leaves it there meanwhile
    claimant.cancel()
    with pytest.raises(asyncio.CancelledError):
        await claimant
    assert (await other).outputs["y"].item() == 4
    assert model.calls == [1, 1] and not batcher._claimed
    await batcher.close()


@pytest.mark.asyncio
async def test_the_worker_leaves_the_queue_alone_while_a_claim_stands() -> None:
    model = ThreadRecording()
    batcher = await measured(model)
    model.entered.clear()
    with batcher._lock:
        batcher._claimed = True  # as a claimant holds it while it yields
    queued = asyncio.create_task(batcher.submit(rows(2), 1, 5))
    await asyncio.sleep(0)
    assert batcher.queued_rows == 1
    # The worker was notified, and holds the GIL whenever this wait releases it: it must still not run.
    assert not await asyncio.to_thread(model.entered.wait, 0.2)
    batcher._unclaim()
    assert (await queued).outputs["y"].item() == 4
    assert model.threads[-1] == batcher._thread.ident
    await batcher.close()


@pytest.mark.asyncio
async def test_an_inline_request_keeps_deadlines_hangups_and_errors() -> None:
    model = ThreadRecording()
    observer = Counting()
    batcher = await measured(model, observer=observer)
    with pytest.raises(DeadlineExceeded):  # its deadline passed before it started: the model never runs
        await batcher.submit(rows(1), 1, timeout_s=0.0)
    with pytest.raises(ClientGone):
        await batcher.submit(rows(1), 1, 5, gone=lambda: True)
    assert observer.abandoned_requests == 1
    with pytest.raises(InferenceFailed):
        await batcher.submit(rows(-1), 1, 5)
    with pytest.raises(InferenceFailed, match="expected 1 rows"):
        await batcher.submit(rows(-2), 1, 5)
    assert observer.failed_batches == [1, 1]

    def refuses(inputs: Mapping[str, np.ndarray], params: Any) -> dict[str, np.ndarray]:
        if params:
            raise InvalidInput("unknown parameter 'p'", field="params")
        return {"y": inputs["x"]}

    checked = Batcher(refuses, max_rows=8, queue_rows=64, inline_max_s=10.0, observer=observer)
    await checked.submit(rows(1), 1, 5)
    with pytest.raises(InvalidInput, match="unknown parameter"):  # the client's error, as it is
        await checked.submit(rows(1), 1, 5, params={"p": 1})
    assert checked.inline == 1 and observer.failed_batches == [1, 1]
    await checked.close()
    # An answer later than the deadline is a deadline error, as from the queue: the model is measured
    # cheap, then one call takes longer than the request's deadline.
    slow = Batcher(
        lambda inputs, params: (model.gate.wait(0.05), {"y": inputs["x"]})[1],
        max_rows=8,
        queue_rows=64,
        inline_max_s=10.0,
    )
    await slow.submit(rows(1), 1, 5)
    model.gate.clear()  # the next call waits 50 ms for a gate nobody opens
    with pytest.raises(DeadlineExceeded):
        await slow.submit(rows(1), 1, timeout_s=0.001)
    assert slow.inline == 1
    await slow.close()
    # After all of these, the next lone request still runs inline and succeeds.
    model.gate.set()
    assert (await batcher.submit(rows(3), 1, 5)).outputs["y"].item() == 6
    assert model.threads[-1] == threading.get_ident()
    await batcher.close()


@pytest.mark.asyncio
async def test_a_closing_batcher_refuses_a_claimant() -> None:
    model = ThreadRecording()
    batcher = await measured(model)
    claimant = asyncio.create_task(batcher.submit(rows(1), 1, 5))
    closing = asyncio.create_task(batcher.close())  # runs while the claimant yields
    with pytest.raises(NotReady):
        await claimant
    await closing
    assert model.calls == [1]
