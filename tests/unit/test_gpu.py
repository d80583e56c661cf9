"""The NVML collector: absent NVML (real on a host without NVIDIA), and a fake NVML for the mapping."""

from __future__ import annotations

import importlib.util
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.gpu import GpuCollector, load_nvml

GIB = 1024**3


class FakeNvmlError(Exception):
    """Stands for ``pynvml.NVMLError``."""


class FakeNvml:
    """Two devices: an A100 with every figure, and a MIG-enabled H100 that refuses some queries."""

    NVMLError = FakeNvmlError

    def __init__(self, unsupported: dict[int, set[str]] | None = None) -> None:
        self.unsupported = unsupported if unsupported is not None else {1: {"util", "power"}}
        self.shut_down = False

    def _check(self, handle: int, query: str) -> None:
        if query in self.unsupported.get(handle, set()):
            raise FakeNvmlError("Not Supported")

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        self._check(handle, "name")
        return "NVIDIA A100-SXM4-40GB" if handle == 0 else b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        self._check(handle, "util")
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        self._check(handle, "memory")
        return SimpleNamespace(used=(10 + handle) * GIB, total=40 * GIB * (handle + 1), free=0)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        self._check(handle, "temp")
        assert sensor == 0  # NVML_TEMPERATURE_GPU
        return 65 + handle

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        self._check(handle, "power")
        return 250_500  # milliwatts

    def nvmlShutdown(self) -> None:
        self.shut_down = True


def scrape(collector: GpuCollector) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Register on a fresh registry, render the text format and parse it back: {name: {labels: value}}."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def device(gpu: str, name: str) -> tuple[tuple[str, str], ...]:
    return (("gpu", gpu), ("name", name))


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="pynvml is installed here")
def test_no_nvml_exports_nothing_and_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.gpu")
    nvml = load_nvml()
    collector = GpuCollector(nvml)
    assert nvml is None
    assert scrape(collector) == {}
    assert list(collector.collect()) == []
    assert len([r for r in caplog.records if r.name == "service.gpu"]) == 1
    assert "GPU metrics off" in caplog.records[0].getMessage()


def test_nvml_init_failure_exports_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """pynvml installed but no driver (a CPU container built with the gpu extra)."""

    def refuse() -> None:
        raise FakeNvmlError("Driver Not Loaded")

    module = SimpleNamespace(NVMLError=FakeNvmlError, nvmlInit=refuse)
    monkeypatch.setattr("service.gpu.importlib.import_module", lambda name: module)
    caplog.set_level(logging.INFO, logger="service.gpu")
    assert load_nvml() is None
    assert scrape(GpuCollector(None)) == {}
    messages = [r.getMessage() for r in caplog.records if r.name == "service.gpu"]
    assert messages == ["GPU metrics off: NVML is unavailable (Driver Not Loaded)"]


def test_fake_nvml_values_are_mapped_to_base_units() -> None:
    families = scrape(GpuCollector(FakeNvml(unsupported={})))
    a100 = device("0", "NVIDIA A100-SXM4-40GB")
    h100 = device("1", "NVIDIA H100 80GB HBM3")  # bytes from old pynvml versions are decoded
    assert families["ferry_gpu_utilization_ratio"] == {a100: 0.87, h100: 0.87}
    assert families["ferry_gpu_memory_used_bytes"] == {a100: 10 * GIB, h100: 11 * GIB}
    assert families["ferry_gpu_memory_total_bytes"] == {a100: 40 * GIB, h100: 80 * GIB}
    assert families["ferry_gpu_temperature_celsius"] == {a100: 65.0, h100: 66.0}
    assert families["ferry_gpu_power_watts"] == {a100: 250.5, h100: 250.5}
    assert "ferry_gpu_cuda_memory_allocated_bytes" not in families


def test_unsupported_query_skips_only_that_value() -> None:
    families = scrape(GpuCollector(FakeNvml()))  # device 1: utilization and power not supported
    a100 = device("0", "NVIDIA A100-SXM4-40GB")
    h100 = device("1", "NVIDIA H100 80GB HBM3")
    assert set(families["ferry_gpu_utilization_ratio"]) == {a100}
    assert set(families["ferry_gpu_power_watts"]) == {a100}
    assert set(families["ferry_gpu_memory_used_bytes"]) == {a100, h100}
    assert set(families["ferry_gpu_temperature_celsius"]) == {a100, h100}


def test_device_that_refuses_its_name_is_skipped_and_family_with_no_value_is_left_out() -> None:
    families = scrape(GpuCollector(FakeNvml(unsupported={0: {"temp"}, 1: {"name"}})))
    assert set(families["ferry_gpu_memory_used_bytes"]) == {device("0", "NVIDIA A100-SXM4-40GB")}
    assert "ferry_gpu_temperature_celsius" not in families


def test_torch_cuda_memory_comes_from_the_injected_callable() -> None:
    collector = GpuCollector(None, cuda_memory=lambda: [("cuda:0", 3 * GIB, 4 * GIB), ("cuda:1", 0, 0)])
    families = scrape(collector)
    assert families["ferry_gpu_cuda_memory_allocated_bytes"] == {
        (("device", "cuda:0"),): 3 * GIB,
        (("device", "cuda:1"),): 0.0,
    }
    assert families["ferry_gpu_cuda_memory_reserved_bytes"][(("device", "cuda:0"),)] == 4 * GIB
    assert not any(name.startswith("ferry_gpu_memory") for name in families)


def test_failing_cuda_callable_does_not_fail_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[tuple[str, int, int]]:
        raise RuntimeError("CUDA error: device-side assert triggered")

    families = scrape(GpuCollector(FakeNvml(unsupported={}), cuda_memory=broken))
    assert "ferry_gpu_memory_used_bytes" in families
    assert "ferry_gpu_cuda_memory_allocated_bytes" not in families
    assert "torch CUDA memory figures failed" in caplog.text


def test_registration_does_not_query_nvml_and_close_shuts_it_down() -> None:
    class CountingNvml(FakeNvml):
        calls = 0

        def nvmlDeviceGetCount(self) -> int:
            self.calls += 1
            return 2

    nvml = CountingNvml()
    collector = GpuCollector(nvml)
    CollectorRegistry(auto_describe=True).register(collector)
    assert nvml.calls == 0
    assert len(list(collector.collect())) == 5
    collector.close()
    assert nvml.shut_down
    assert list(collector.collect()) == []
