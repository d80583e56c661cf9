"""One load of a model at a time (``ModelSet.load``): a caller asking for what the load in
progress will give joins it, any other load of that model waits for it, the reloader skips a model that
is loading, and no exception of a load or a poll stops the others. A fake registry whose ``load`` waits
at a gate (``fakes.py``) holds a load in progress for as long as a test needs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from fakes import FakeRegistry
from service.config import ReloadSettings, Settings
from service.errors import ModelLoadError
from service.lifecycle import ModelSet
from service.metrics import Metrics
from service.registry import ModelRef
from service.reloader import Reloader


def service_of(registry: FakeRegistry, *models: str) -> tuple[ModelSet, Metrics]:
    metrics = Metrics()
    settings = Settings(models=[f"{m}=models:/{m}@champion" for m in models])
    return ModelSet(settings, registry, metrics), metrics  # type: ignore[arg-type]


async def until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


@pytest.mark.asyncio
async def test_a_poll_during_a_load_skips_and_a_second_caller_joins() -> None:
    registry = FakeRegistry()
    registry.gate.clear()
    service, metrics = service_of(registry, "m")
    reloader = Reloader(service, registry, metrics, ReloadSettings(poll_s=0.01))  # type: ignore[arg-type]
    starting = asyncio.create_task(service.start())
    await until(lambda: registry.loads)
    assert service.loading("m")
    assert await reloader.check(service.find("m")) == "loading"
    joined = asyncio.create_task(service.load("m"))  # the admin API's reload: same URI, same version
    await asyncio.sleep(0.05)
    registry.gate.set()
    await starting
    assert (await joined).active is service.find("m").active
    assert registry.loads == [("m", "1")], "one load, however many asked"
    assert not service.loading("m")
    assert await reloader.check(service.find("m")) == "unchanged"
    samples = {
        s.name: s.value for s in metrics.load_duration.collect()[0].samples if s.labels["model"] == "m"
    }
    assert samples["ferry_model_load_duration_seconds_count"] == 1
    await service.close()


@pytest.mark.asyncio
async def test_a_load_of_another_version_waits_for_the_one_in_progress() -> None:
    registry = FakeRegistry()
    registry.gate.clear()
    service, _ = service_of(registry, "m")
    first = asyncio.create_task(service.load("m"))
    await until(lambda: registry.loads)
    second = asyncio.create_task(service.load("m"))  # joins: the same URI, resolved to version 1
    registry.version = "2"
    other = asyncio.create_task(service.load("m", ref=registry.resolve("models:/m@champion")))
    await asyncio.sleep(0.05)
    assert registry.loads == [("m", "1")], "the version-2 load started while version 1 was loading"
    registry.gate.set()
    await asyncio.gather(first, second, other)
    assert registry.loads == [("m", "1"), ("m", "2")]
    assert service.find("m").active is not None and service.find("m").active.version == "2"
    await service.close()


@pytest.mark.asyncio
async def test_a_cancelled_caller_leaves_the_load_running() -> None:
    registry = FakeRegistry()
    registry.gate.clear()
    service, _ = service_of(registry, "m")
    caller = asyncio.create_task(service.load("m"))
    await until(lambda: registry.loads)
    caller.cancel()
    registry.gate.set()
    await until(lambda: service.find("m").state == "ready")
    assert registry.loads == [("m", "1")]
    await service.close()


@pytest.mark.asyncio
async def test_any_exception_of_a_load_fails_that_model_only_and_the_reloader_keeps_going(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = FakeRegistry()
    registry.fail_with = OSError(28, "No space left on device")
    service, metrics = service_of(registry, "a", "b")
    await service.start()  # does not raise: every model it can, the others reported
    assert {s.name: s.state for s in service.slots()} == {"a": "failed", "b": "failed"}
    assert "No space left on device" in (service.find("a").error or "")
    reloader = Reloader(service, registry, metrics, ReloadSettings(poll_s=0.01))  # type: ignore[arg-type]
    registry.fail_with = None
    await reloader.check_all()  # backoff after the start-up failure does not apply: never rejected here
    assert {s.name: s.state for s in service.slots()} == {"a": "ready", "b": "ready"}
    await service.close()


@pytest.mark.asyncio
async def test_a_poll_that_raises_something_unexpected_is_logged_and_polling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = FakeRegistry()
    service, metrics = service_of(registry, "a", "b")
    await service.start()
    calls: list[str] = []

    def broken_resolve(uri: str) -> ModelRef:
        calls.append(uri)
        if "/a@" in uri:
            raise ValueError("a bug in a registry plugin")
        return ModelRef(uri=uri, alias="champion", version="2", download_uri=uri)

    registry.resolve = broken_resolve  # type: ignore[method-assign]
    reloader = Reloader(service, registry, metrics, ReloadSettings(poll_s=0.01))  # type: ignore[arg-type]
    task = asyncio.create_task(reloader.run())
    await until(lambda: len(calls) >= 4)
    assert not task.done(), "the reloader stopped"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert service.find("b").active is not None and service.find("b").active.version == "2"
    assert "alias check failed" in caplog.text
    await service.close()


def test_a_load_failure_that_ferry_does_not_know_becomes_a_model_load_error() -> None:
    registry = FakeRegistry()
    registry.fail_with = RuntimeError("boom")
    service, metrics = service_of(registry, "m")

    async def go() -> None:
        with pytest.raises(ModelLoadError, match="failed at load: RuntimeError"):
            await service.load("m")
        await service.close()

    asyncio.run(go())
    assert service.find("m").state == "stopped"
    failures = [s for s in metrics.load_failures.collect()[0].samples if s.name.endswith("_total")]
    assert [(s.labels["stage"], s.value) for s in failures] == [("load", 1.0)]


@pytest.mark.asyncio
async def test_a_retired_version_s_files_are_deleted_unless_another_model_serves_them() -> None:
    registry = FakeRegistry()
    service, _ = service_of(registry, "m", "twin")  # both models:/…@champion of their own names
    await service.start()
    await service.load("m")  # the same version again: its files still serve
    assert registry.discarded == []
    registry.version = "2"
    await service.load("m")
    assert registry.discarded == ["models:/m/1"]
    await service.add("twin", "models:/m@champion")  # twin now serves models:/m/2 too
    assert registry.discarded == ["models:/m/1", "models:/twin/1"]
    await service.remove("m")
    assert registry.discarded == ["models:/m/1", "models:/twin/1"], "twin still serves models:/m/2"
    await service.close()


@pytest.mark.parametrize(
    ("flavors", "loader"),
    [
        ({"onnx": {}, "python_function": {"loader_module": "mlflow.onnx"}}, "onnx"),
        ({"pytorch": {}, "python_function": {"loader_module": "mlflow.pytorch"}}, "pytorch"),
        ({"sklearn": {}, "python_function": {"loader_module": "mlflow.sklearn"}}, "sklearn"),
        ({"python_function": {"loader_module": "mlflow.pyfunc.model"}}, "python_function"),
        ({"python_function": {"loader_module": "mlflow.pyfunc.loaders.code_model"}}, "python_function"),
        ({"python_function": {"loader_module": "my_company.loader"}}, "python_function"),
        ({"keras": {}}, ""),
    ],
)
def test_the_flavor_checked_against_allowed_flavors_is_the_one_whose_code_loads(
    flavors: dict[str, Any], loader: str
) -> None:
    from service.registry import loading_flavor

    assert loading_flavor(flavors) == loader


def test_the_default_allows_only_flavors_whose_loading_runs_no_artifact_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.config import Settings

    monkeypatch.delenv("FERRY_ALLOWED_FLAVORS")
    assert Settings().allowed_flavors == ["onnx", "pytorch"]
    monkeypatch.setenv("FERRY_ALLOWED_FLAVORS", "sklearn, python_function")
    assert Settings().allowed_flavors == ["sklearn", "python_function"]
