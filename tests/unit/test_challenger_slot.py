"""The challenger beside a served model (``ModelSet.follow_challenger``), with a fake registry whose
aliases move in the test: loaded at start-up after the champion, replaced when its alias moves, dropped
when the alias goes or names the champion's version, dropped with its champion when that is unloaded,
charged to the memory budget under its own name, and a version that fails is not retried at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fakes import FakeRegistry
from service.config import Settings
from service.errors import ModelLoadError, ModelNotFound
from service.lifecycle import ModelSet
from service.metrics import Metrics
from service.registry import ModelRef


class AliasRegistry(FakeRegistry):
    """``models:/NAME@ALIAS`` resolves to ``aliases[ALIAS]``; each version has ``size`` bytes of files."""

    def __init__(self, root: Path, aliases: dict[str, str], size: int = 1000) -> None:
        super().__init__()
        self.root, self.aliases, self.size = root, aliases, size
        self.broken: set[str] = set()

    def resolve(self, uri: str) -> ModelRef:
        name, _, alias = uri.removeprefix("models:/").partition("@")
        if alias not in self.aliases:
            raise ModelNotFound(f"no alias {alias}")
        version = self.aliases[alias]
        source = f"models:/{name}/{version}"
        return ModelRef(uri=uri, alias=alias, version=version, download_uri=source, source=source)

    def load(self, name, ref):  # type: ignore[no-untyped-def]
        if ref.version in self.broken:
            self.loads.append((name, ref.version))
            raise ModelLoadError(f"v{ref.version} is broken")
        return super().load(name, ref)

    def download(self, name: str, ref: ModelRef) -> Path:
        folder = self.root / name / ref.version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.bin").write_bytes(b"\0" * self.size)
        return folder


def service(tmp_path: Path, mode: str = "canary", **extra: object) -> tuple[ModelSet, AliasRegistry, Metrics]:
    registry = AliasRegistry(tmp_path, {"champion": "1", "challenger": "2"})
    metrics = Metrics()
    settings = Settings(models=["a=models:/a@champion"], challenger={"mode": mode}, **extra)  # type: ignore[arg-type]
    return ModelSet(settings, registry, metrics), registry, metrics  # type: ignore[arg-type]


def gauge(metrics: Metrics, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.mark.asyncio
async def test_start_up_loads_the_challenger_and_it_follows_its_alias(tmp_path: Path) -> None:
    models, registry, metrics = service(tmp_path)
    await models.start()
    try:
        assert models.active("a").version == "1"
        first = models.challenger("a")
        assert first is not None and first.version == "2"
        assert gauge(metrics, "ferry_challenger_ready", model="a") == 1
        assert await models.follow_challenger("a") == "unchanged"
        registry.aliases["challenger"] = "3"
        assert await models.follow_challenger("a") == "loaded"
        second = models.challenger("a")
        assert second is not None and second.version == "3" and first.batcher.closing  # retired
        assert gauge(metrics, "ferry_model_info", model="a", version="3", alias="challenger") == 1
        assert gauge(metrics, "ferry_model_info", model="a", version="2") == 0
        del registry.aliases["challenger"]
        assert await models.follow_challenger("a") == "removed"
        assert models.challenger("a") is None and second.batcher.closing
        assert gauge(metrics, "ferry_challenger_ready", model="a") == 0
        assert await models.follow_challenger("a") == "absent"
        registry.aliases["challenger"] = "1"  # promoted: the champion's own version
        assert await models.follow_challenger("a") == "champion"
        assert models.challenger("a") is None
        assert models.active("a").version == "1" and not models.active("a").batcher.closing
    finally:
        await models.close()


@pytest.mark.asyncio
async def test_off_loads_no_challenger(tmp_path: Path) -> None:
    models, registry, _ = service(tmp_path, mode="off")
    await models.start()
    try:
        assert await models.follow_challenger("a") == "none"
        assert models.challenger("a") is None and registry.loads == [("a", "1")]
    finally:
        await models.close()


@pytest.mark.asyncio
async def test_the_challenger_goes_with_its_unloaded_champion(tmp_path: Path) -> None:
    models, _, _ = service(tmp_path)
    await models.start()
    try:
        challenger = models.challenger("a")
        assert challenger is not None
        await models.unload("a")
        for _ in range(100):  # dropped by a task of its own (unloading cannot wait for it)
            if challenger.batcher.closing and models.challenger("a") is None:
                break
            await asyncio.sleep(0.01)
        assert models.challenger("a") is None and challenger.batcher.closing
        assert await models.follow_challenger("a") == "no-champion"
    finally:
        await models.close()


@pytest.mark.asyncio
async def test_a_failing_challenger_is_not_retried_at_once_and_leaves_the_champion(tmp_path: Path) -> None:
    models, registry, _ = service(tmp_path)
    registry.broken.add("2")
    await models.start()
    try:
        assert models.challenger("a") is None and models.active("a").version == "1"
        loads = len(registry.loads)
        assert await models.follow_challenger("a") == "backoff"
        assert len(registry.loads) == loads, "the broken version was not loaded again"
        registry.aliases["challenger"] = "3"  # the alias moved: tried at once
        assert await models.follow_challenger("a") == "loaded"
    finally:
        await models.close()


@pytest.mark.asyncio
async def test_the_memory_budget_charges_the_challenger_under_its_own_name(tmp_path: Path) -> None:
    models, _, metrics = service(tmp_path, memory={"budget_bytes": 2500})
    await models.start()
    try:
        assert models.budget.charges() == {"a": 1000, "a@challenger": 1000}
        assert gauge(metrics, "ferry_memory_used_bytes") == 2000
    finally:
        await models.close()
    models, _, metrics = service(tmp_path, memory={"budget_bytes": 1500})
    await models.start()
    try:
        assert models.challenger("a") is None, "it does not fit, and nothing is evicted for it"
        assert models.budget.charges() == {"a": 1000}
        assert models.active("a").version == "1"
    finally:
        await models.close()
