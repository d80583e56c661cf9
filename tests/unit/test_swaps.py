"""Coordinated swaps across workers (``service/swaps.py``), in process: the supervisor's ``Coordinator``
as a state machine, and two or three ``ModelSet``s (fake registries) joined to it by real socket pairs
through ``SwapClient``, as worker processes are. The real supervisor and worker processes are tested in
tests/integration/test_swaps_workers.py."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fakes import FakeRegistry
from service.config import ReloadSettings, Settings
from service.errors import ModelLoadError, ModelNotFound
from service.lifecycle import ModelSet, ModelState
from service.metrics import Metrics
from service.reloader import Reloader
from service.swaps import PREPARE_MIN_S, Coordinator, SwapClient, encode


def ref(version: str, model: str = "m") -> dict[str, Any]:
    source = f"models:/{model}/{version}"
    return {"uri": f"models:/{model}@champion", "alias": "champion", "version": version,
            "download_uri": source, "source": source, "path": None}  # fmt: skip


def propose(worker: int, action: str = "load", version: str = "2", reason: str = "reload") -> dict[str, Any]:
    return {"op": "propose", "id": 7, "action": action, "model": "m", "uri": "models:/m@champion",
            "ref": ref(version) if action in ("load", "add") else None, "reason": reason}  # fmt: skip


def ops(out: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, str]]:
    return [(w, m["op"]) for w, m in out]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def two_workers(clock: Clock | None = None) -> Coordinator:
    coordinator = Coordinator(Metrics(process=False), clock or Clock())
    for worker in (0, 1):
        coordinator.received(worker, {"op": "hello"})
    assert ops(coordinator.take()) == [(0, "pins"), (1, "pins")]
    return coordinator


def rounds(coordinator: Coordinator, action: str, result: str) -> float:
    assert coordinator.metrics is not None
    return coordinator.metrics.swap_rounds.labels(action, result)._value.get()


# -- the Coordinator -------------------------------------------------------------------------------------
def test_a_load_commits_only_when_every_worker_staged_it() -> None:
    clock = Clock()
    coordinator = two_workers(clock)
    coordinator.received(0, propose(0))
    out = coordinator.take()
    assert ops(out) == [(0, "prepare"), (1, "prepare")]
    assert out[0][1]["ref"]["version"] == "2" and out[0][1]["reason"] == "reload"
    round_id = out[0][1]["round"]
    coordinator.received(0, {"op": "staged", "round": round_id})
    assert coordinator.take() == [], "no commit before the other worker staged it"
    coordinator.received(1, {"op": "staged", "round": round_id})
    assert ops(coordinator.take()) == [(0, "commit"), (1, "commit")]
    assert coordinator.entries["m"].ref == ref("2")
    clock.now = 0.001
    coordinator.received(0, {"op": "swapped", "round": round_id})
    clock.now = 0.004
    coordinator.received(1, {"op": "swapped", "round": round_id})  # the last swap: 4 ms after the commit
    clock.now = 0.050
    coordinator.received(1, {"op": "done", "round": round_id})  # its old version retired
    assert coordinator.take() == []
    coordinator.received(0, {"op": "done", "round": round_id})
    assert coordinator.take() == [(0, {"op": "result", "id": 7, "ok": True, "outcome": "committed"})]
    assert coordinator.commit_seconds == [pytest.approx(0.004)]
    assert rounds(coordinator, "load", "committed") == 1
    assert coordinator.round is None


def test_one_failed_worker_aborts_the_round_for_all() -> None:
    coordinator = two_workers()
    coordinator.received(1, propose(1))
    round_id = coordinator.take()[0][1]["round"]
    coordinator.received(0, {"op": "staged", "round": round_id})
    coordinator.received(1, {"op": "failed", "round": round_id, "error": "warm-up has NaN",
                             "kind": "ModelLoadError"})  # fmt: skip
    out = coordinator.take()
    assert ops(out) == [(0, "abort"), (1, "abort"), (1, "result")]
    assert out[2][1]["ok"] is False and out[2][1]["kind"] == "ModelLoadError"
    assert out[2][1]["error"] == "worker 1: warm-up has NaN"
    assert "m" not in coordinator.entries, "nothing committed"
    assert rounds(coordinator, "load", "rejected") == 1


def test_a_worker_that_does_not_stage_in_time_aborts_the_round() -> None:
    clock = Clock()
    coordinator = two_workers(clock)
    coordinator.received(0, propose(0))
    round_id = coordinator.take()[0][1]["round"]
    coordinator.received(0, {"op": "staged", "round": round_id})
    clock.now = PREPARE_MIN_S - 1
    coordinator.tick()
    assert coordinator.take() == []
    clock.now = PREPARE_MIN_S + 1
    coordinator.tick()
    out = coordinator.take()
    assert ops(out) == [(0, "abort"), (1, "abort"), (0, "result")]
    assert "worker(s) [1] did not load it within 300 s" in out[2][1]["error"]
    coordinator.received(1, {"op": "serving", "model": "m", "uri": "u", "ref": ref("1"), "seconds": 200.0})
    assert coordinator.prepare_timeout_s == 600.0, "three times the slowest load a worker reported"


def test_a_worker_that_dies_leaves_the_round_and_a_new_one_is_brought_up_to_date() -> None:
    coordinator = two_workers()
    coordinator.received(0, propose(0))
    round_id = coordinator.take()[0][1]["round"]
    coordinator.received(0, {"op": "staged", "round": round_id})
    coordinator.left(1)  # died while loading
    out = coordinator.take()
    assert ops(out) == [(0, "commit")]
    coordinator.received(1, {"op": "hello"})  # its replacement: the committed state, v2
    pins = coordinator.take()[0][1]
    assert pins["models"]["m"]["ref"]["version"] == "2"
    coordinator.received(0, {"op": "done", "round": round_id})
    assert ops(coordinator.take()) == [(0, "result")]


def test_a_worker_that_joined_while_a_round_prepared_loads_the_committed_version() -> None:
    coordinator = two_workers()
    coordinator.left(1)
    coordinator.received(0, propose(0))
    round_id = coordinator.take()[0][1]["round"]
    coordinator.received(1, {"op": "hello"})  # restarted meanwhile: pins without v2
    assert "m" not in coordinator.take()[0][1]["models"]
    coordinator.received(0, {"op": "staged", "round": round_id})
    out = coordinator.take()
    assert ops(out) == [(0, "commit"), (1, "apply")]
    assert out[1][1]["action"] == "load" and out[1][1]["ref"]["version"] == "2"


def test_reports_set_the_first_committed_version_and_a_different_one_is_corrected() -> None:
    coordinator = two_workers()
    coordinator.received(0, {"op": "serving", "model": "m", "uri": "models:/m@champion", "ref": ref("1")})
    coordinator.received(1, {"op": "serving", "model": "m", "uri": "models:/m@champion", "ref": ref("1")})
    assert coordinator.take() == []
    coordinator.received(1, {"op": "serving", "model": "m", "uri": "models:/m@champion", "ref": ref("3")})
    out = coordinator.take()
    assert ops(out) == [(1, "apply")]
    assert out[0][1]["action"] == "load" and out[0][1]["ref"]["version"] == "1"


def test_a_second_proposal_of_the_committed_version_is_unchanged() -> None:
    coordinator = two_workers()
    coordinator.received(0, {"op": "serving", "model": "m", "uri": "models:/m@champion", "ref": ref("2")})
    coordinator.received(1, propose(1, version="2"))
    assert coordinator.take() == [(1, {"op": "result", "id": 7, "ok": True, "outcome": "unchanged"})]
    assert rounds(coordinator, "load", "unchanged") == 1
    coordinator.received(1, propose(1, version="2", reason="admin"))  # a forced reload is a round
    assert ops(coordinator.take()) == [(0, "prepare"), (1, "prepare")]


def test_remove_and_unload_apply_at_once_and_rounds_queue() -> None:
    coordinator = two_workers()
    coordinator.received(0, {"op": "serving", "model": "m", "uri": "models:/m@champion", "ref": ref("1")})
    coordinator.received(1, propose(1, action="unload", reason="repository"))
    coordinator.received(0, propose(0, action="remove", reason="admin"))  # queued behind the unload
    out = coordinator.take()
    assert ops(out) == [(0, "apply"), (1, "apply")] and out[0][1]["action"] == "unload"
    assert coordinator.entries["m"].unloaded
    for worker in (0, 1):
        coordinator.received(worker, {"op": "done", "round": out[0][1]["round"]})
    out = coordinator.take()
    assert ops(out) == [(1, "result"), (0, "apply"), (1, "apply")] and out[1][1]["action"] == "remove"
    assert "m" not in coordinator.entries and coordinator.removed == {"m"}
    assert coordinator.pins()["removed"] == ["m"]


# -- ModelSets joined by real socket pairs ---------------------------------------------------------------
class Hub:
    """The supervisor's message loop, in this test's event loop, over real socket pairs."""

    def __init__(self) -> None:
        self.coordinator = Coordinator(Metrics(process=False))
        self.writers: dict[int, asyncio.StreamWriter] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def join(self, index: int, registry: FakeRegistry, *models: str) -> tuple[ModelSet, SwapClient]:
        mine, theirs = socket.socketpair()
        reader, self.writers[index] = await asyncio.open_unix_connection(sock=mine)
        self.tasks.append(asyncio.create_task(self._read(index, reader)))
        settings = Settings(models=[f"{m}=models:/{m}@champion" for m in models])
        service = ModelSet(settings, registry, Metrics())  # type: ignore[arg-type]
        client = SwapClient(theirs, index, service, registry)  # type: ignore[arg-type]
        await client.connect()
        service.coordinator = client
        await service.start()
        return service, client

    async def _read(self, index: int, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.coordinator.received(index, json.loads(line))
            for worker, message in self.coordinator.take():
                self.writers[worker].write(encode(message))
        self.coordinator.left(index)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers.values():
            writer.close()


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def version(service: ModelSet, name: str = "m") -> str | None:
    active = service.find(name).active
    return active.version if active is not None else None


@pytest.mark.asyncio
async def test_a_moved_alias_swaps_on_every_worker_or_on_none() -> None:
    hub = Hub()
    registries = [FakeRegistry(), FakeRegistry()]
    (a, client_a), (b, client_b) = [await hub.join(i, r, "m") for i, r in enumerate(registries)]
    assert version(a) == version(b) == "1"
    reloader = Reloader(a, registries[0], Metrics(), ReloadSettings(poll_s=1))  # type: ignore[arg-type]
    for registry in registries:
        registry.version = "2"
    assert await reloader.check(a.find("m")) == "swapped"
    assert version(a) == version(b) == "2"
    assert hub.coordinator.entries["m"].ref is not None and hub.coordinator.entries["m"].ref["version"] == "2"
    assert len(hub.coordinator.commit_seconds) == 1

    # version 3 fails on worker 1 only: rejected for both, version 2 keeps serving on both
    for registry in registries:
        registry.version = "3"
    registries[1].fail_with = ModelLoadError("v3 does not load here")
    await until(lambda: not a.loading("m") and not b.loading("m"))
    assert await reloader.check(a.find("m")) == "rejected"
    assert version(a) == version(b) == "2"
    assert ("m", "3") in registries[0].loads, "worker 0 loaded and staged v3 before the abort"
    assert a.find("m").state == ModelState.READY and b.find("m").state == ModelState.READY

    # a third worker (a restart) loads the committed version 2, though its registry says 3
    late = FakeRegistry("3")
    c, client_c = await hub.join(2, late, "m")
    assert version(c) == "2" and late.loads == [("m", "2")]
    for client in (client_a, client_b, client_c):
        await client.close()
    await hub.close()
    for service in (a, b, c):
        await service.close()


@pytest.mark.asyncio
async def test_admin_changes_act_on_every_worker() -> None:
    hub = Hub()
    registries = [FakeRegistry(), FakeRegistry()]
    (a, client_a), (b, client_b) = [await hub.join(i, r, "m") for i, r in enumerate(registries)]
    await b.add("extra", "models:/extra@champion")  # the admin API on worker 1
    assert version(a, "extra") == version(b, "extra") == "1"
    await a.unload("extra")
    assert a.find("extra").state == b.find("extra").state == ModelState.UNLOADED
    await a.remove("extra")
    for service in (a, b):
        with pytest.raises(ModelNotFound):
            service.find("extra")
    late = FakeRegistry()
    c, client_c = await hub.join(2, late, "m", "extra")  # configured, but removed by the admin API
    assert [s.name for s in c.slots()] == ["m"]
    for client in (client_a, client_b, client_c):
        await client.close()
    await hub.close()
    for service in (a, b, c):
        await service.close()


# -- FERRY_WORKERS=auto ------------------------------------------------------------------------------
def test_auto_counts_the_cgroup_cpu_limit(tmp_path: Path) -> None:
    import os

    from service.workers import usable_cores

    cores = len(os.sched_getaffinity(0))
    assert usable_cores(str(tmp_path)) == cores  # no cgroup files: the CPUs it may run on
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(str(tmp_path)) == cores
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a container limited to 1.5 CPUs
    assert usable_cores(str(tmp_path)) == min(cores, 2)
    (tmp_path / "cpu.max").write_text("10000 100000\n")
    assert usable_cores(str(tmp_path)) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1, 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(str(tmp_path)) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1: no limit
    assert usable_cores(str(tmp_path)) == cores
