"""More models than memory (issue 16): the least-recently-used policy of ``budget.MemoryBudget`` alone,
then ``ModelSet`` under a budget with a fake registry whose models have files of known sizes on disk
(the size Ferry measures): start-up loads while they fit, a request loads an unloaded model and evicts
the least recently used idle one, a model in use is never evicted, concurrent first requests share one
load, and the reloader leaves unloaded models alone."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fakes import FakeRegistry
from service.budget import MemoryBudget, files_size
from service.config import ReloadSettings, Settings
from service.errors import OverBudget
from service.lifecycle import ModelSet, ModelState
from service.metrics import Metrics
from service.registry import ModelRef
from service.reloader import Reloader

# -- the policy alone -------------------------------------------------------------------------------


def test_plan_unloads_the_least_recently_used_idle_models_first() -> None:
    budget = MemoryBudget(300)
    for name in ("a", "b", "c"):
        budget.charge(name, 100)
    budget.touch("b")
    budget.touch("a")
    budget.touch("c")  # b is now the least recently used
    assert budget.plan("d", 100, idle={"a", "b", "c"}) == ["b"]
    assert budget.plan("d", 200, idle={"a", "b", "c"}) == ["b", "a"]
    assert budget.plan("d", 200, idle={"a", "c"}) == ["a", "c"], "b is busy: the next ones go"


def test_plan_unloads_nothing_when_it_fits_and_counts_a_reload_in_place_of_its_old_size() -> None:
    budget = MemoryBudget(300)
    budget.charge("a", 100)
    budget.charge("b", 100)
    assert budget.plan("c", 100, idle={"a", "b"}) == []
    assert budget.plan("a", 200, idle={"b"}) == [], "a's new version replaces its 100 bytes"
    assert budget.plan("a", 250, idle={"b"}) == ["b"]


def test_plan_refuses_naming_the_budget_and_the_sizes() -> None:
    budget = MemoryBudget(1000)
    budget.charge("a", 600)
    budget.charge("b", 300)
    with pytest.raises(OverBudget) as busy:
        budget.plan("c", 500, idle={"b"})
    message = busy.value.message
    assert "FERRY_MEMORY__BUDGET_BYTES" in message and "1,000 bytes" in message
    assert "500 bytes" in message and "a 600 bytes" in message, message
    assert busy.value.status == 503
    with pytest.raises(OverBudget, match="more than the whole memory budget"):
        budget.plan("huge", 1001, idle={"a", "b"})


def test_no_budget_plans_nothing_and_release_returns_the_charge() -> None:
    assert MemoryBudget(None).plan("a", 10**12, idle=()) == []
    budget = MemoryBudget(10)
    budget.charge("a", 7)
    assert budget.used == 7 and budget.release("a") == 7 and budget.used == 0


def test_files_size_counts_regular_files_not_links(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(b"x" * 1000)
    (tmp_path / "MLmodel").write_bytes(b"y" * 24)
    (tmp_path / "link").symlink_to(tmp_path / "sub" / "w.bin")
    assert files_size(tmp_path) == 1024


# -- ModelSet under a budget ------------------------------------------------------------------------


class SizedRegistry(FakeRegistry):
    """A fake registry whose model ``NAME`` has ``sizes[NAME]`` bytes of files on disk."""

    def __init__(self, root: Path, sizes: dict[str, int]) -> None:
        super().__init__()
        self.root, self.sizes = root, sizes
        self.downloads: list[str] = []

    def download(self, name: str, ref: ModelRef) -> Path:
        self.downloads.append(name)
        folder = self.root / name / ref.version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.bin").write_bytes(b"\0" * self.sizes[name])
        return folder


SIZES = {"a": 4000, "b": 3000, "c": 2000}
"""A budget of 7,500 bytes holds a and b (7,000), or any two with c, never all three."""


def budget_service(tmp_path: Path, budget: int = 7500) -> tuple[ModelSet, SizedRegistry, Metrics]:
    registry = SizedRegistry(tmp_path, SIZES)
    metrics = Metrics()
    settings = Settings(models=[f"{m}=models:/{m}@champion" for m in SIZES], memory={"budget_bytes": budget})
    return ModelSet(settings, registry, metrics), registry, metrics  # type: ignore[arg-type]


def counted(metrics: Metrics, metric: str, **labels: str) -> float:
    return sum(
        s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())
    )


def ready_series(metrics: Metrics) -> dict[str, float]:
    """``ferry_model_ready`` by model: an unloaded model has no series (no not-ready alert)."""
    return {
        s.labels["model"]: s.value
        for family in metrics.registry.collect()
        if family.name == "ferry_model_ready"
        for s in family.samples
    }


async def predict(service: ModelSet, name: str) -> Any:
    async with service.serving(name, 10.0) as active:
        x = np.ones((1, 2), dtype=np.float32)
        return (await active.batcher.submit({"x": x}, 1, 10.0)).outputs["y"]


@pytest.mark.asyncio
async def test_start_up_loads_while_they_fit_and_the_rest_waits_unloaded(tmp_path: Path) -> None:
    service, registry, metrics = budget_service(tmp_path)
    await service.start()
    states = {s.name: s.state for s in service.slots()}
    assert states == {"a": ModelState.READY, "b": ModelState.READY, "c": ModelState.UNLOADED}
    assert [name for name, _ in registry.loads] == ["a", "b"], "c's runtime was never loaded"
    assert service.ready(), "an unloaded model does not hold readiness back"
    assert service.budget.used == 7000
    assert counted(metrics, "ferry_memory_used_bytes") == 7000
    assert counted(metrics, "ferry_memory_budget_bytes") == 7500
    assert ready_series(metrics) == {"a": 1.0, "b": 1.0}
    assert "FERRY_MEMORY__BUDGET_BYTES" in (service.find("c").error or "")
    await service.close()


@pytest.mark.asyncio
async def test_a_request_loads_an_unloaded_model_evicting_the_least_recently_used_idle_one(
    tmp_path: Path,
) -> None:
    service, _registry, metrics = budget_service(tmp_path)
    await service.start()
    await predict(service, "a")  # b is now the least recently used
    await predict(service, "c")
    states = {s.name: s.state for s in service.slots()}
    assert states == {"a": ModelState.READY, "b": ModelState.UNLOADED, "c": ModelState.READY}
    assert service.budget.used == 6000
    assert counted(metrics, "ferry_model_loads_total", model="c", reason="first_request") == 1
    assert counted(metrics, "ferry_model_unloads_total", model="b", reason="evicted") == 1
    assert ready_series(metrics) == {"a": 1.0, "c": 1.0}
    assert service.ready()
    await predict(service, "b")  # a was used before c: a goes
    assert service.find("a").state == ModelState.UNLOADED and service.find("b").state == ModelState.READY
    assert service.budget.used == 5000
    await service.close()


@pytest.mark.asyncio
async def test_a_model_in_use_is_never_evicted(tmp_path: Path) -> None:
    service, _registry, _metrics = budget_service(tmp_path, budget=7000)
    await service.start()
    async with service.serving("a", 10.0), service.serving("b", 10.0):
        with pytest.raises(OverBudget) as refused:
            await predict(service, "c")
        assert "in use or loading: a 4,000 bytes" in refused.value.message
        assert service.find("a").active is not None and service.find("b").active is not None
    assert service.find("c").state == ModelState.UNLOADED, "it loads on its next request"
    async with service.serving("a", 10.0):  # b idle now: b goes, a stays
        await predict(service, "c")
        assert service.find("b").state == ModelState.UNLOADED
        assert service.find("a").state == ModelState.READY
    await service.close()


@pytest.mark.asyncio
async def test_concurrent_first_requests_share_one_load(tmp_path: Path) -> None:
    service, registry, metrics = budget_service(tmp_path)
    await service.start()
    registry.gate.clear()
    requests = [asyncio.create_task(predict(service, "c")) for _ in range(8)]
    await asyncio.sleep(0.1)
    assert service.find("c").state == ModelState.LOADING
    registry.gate.set()
    answers = await asyncio.gather(*requests)
    assert all(float(a[0, 0]) == 1.0 for a in answers)  # the fake's factor is its version, 1
    assert [n for n, _ in registry.loads].count("c") == 1
    assert counted(metrics, "ferry_model_loads_total", model="c") == 1
    await service.close()


@pytest.mark.asyncio
async def test_a_load_that_outlasts_the_deadline_answers_504_and_goes_on(tmp_path: Path) -> None:
    service, registry, _metrics = budget_service(tmp_path)
    await service.start()
    registry.gate.clear()
    from service.errors import DeadlineExceeded

    with pytest.raises(DeadlineExceeded, match="FERRY_BATCH__TIMEOUT_MS"):
        async with service.serving("c", 0.05):
            pass
    registry.gate.set()
    for _ in range(200):
        if service.find("c").state == ModelState.READY:
            break
        await asyncio.sleep(0.01)
    assert service.find("c").state == ModelState.READY
    await service.close()


@pytest.mark.asyncio
async def test_the_reloader_leaves_unloaded_models_alone(tmp_path: Path) -> None:
    service, registry, metrics = budget_service(tmp_path)
    await service.start()
    reloader = Reloader(service, registry, metrics, ReloadSettings(poll_s=1))  # type: ignore[arg-type]
    registry.version = "2"  # every alias moves
    assert await reloader.check(service.find("c")) == "unloaded"
    assert [n for n, _ in registry.loads] == ["a", "b"]
    assert await reloader.check(service.find("b")) == "swapped"  # a loaded one follows its alias
    await predict(service, "c")  # c loads the version its alias names now
    assert service.find("c").active is not None and service.find("c").active.version == "2"  # type: ignore[union-attr]
    await service.close()


@pytest.mark.asyncio
async def test_an_explicit_unload_keeps_the_model_listed_and_does_not_load_it_on_demand(
    tmp_path: Path,
) -> None:
    service, _registry, metrics = budget_service(tmp_path)
    await service.start()
    await service.unload("a")
    slot = service.find("a")
    assert slot.state == ModelState.UNLOADED and not slot.on_demand
    assert service.ready()
    from service.errors import NotReady

    with pytest.raises(NotReady, match="unloaded"):
        await predict(service, "a")
    assert counted(metrics, "ferry_model_unloads_total", model="a", reason="repository") == 1
    await service.load("a", reason="repository")
    assert service.find("a").state == ModelState.READY
    await service.close()


@pytest.mark.asyncio
async def test_start_up_says_the_model_loads_on_its_first_request(tmp_path: Path) -> None:
    service, _registry, _metrics = budget_service(tmp_path)
    await service.start()
    error = service.find("c").error or ""
    assert "2,000 bytes" in error and "500 bytes of the memory budget of 7,500 bytes" in error, error
    assert "it loads on its first request" in error
    await service.close()


@pytest.mark.asyncio
async def test_a_model_larger_than_the_budget_is_refused_without_asking_again(tmp_path: Path) -> None:
    service, registry, _metrics = budget_service(tmp_path, budget=3500)  # a (4,000 bytes) never fits
    await service.start()
    assert service.find("a").state == ModelState.UNLOADED and service.find("b").state == ModelState.READY
    assert service.ready()
    downloads = len(registry.downloads)
    for _ in range(3):
        with pytest.raises(OverBudget, match="more than the whole memory budget"):
            await predict(service, "a")
    # Each refusal stands for its Retry-After (1 s): three requests at once ask the registry once at most.
    assert len(registry.downloads) <= downloads + 1, registry.downloads
    assert service.find("b").state == ModelState.READY, "nothing was evicted for a model that cannot fit"
    await service.close()
