"""GPU metrics read from NVML at scrape time, plus torch's CUDA allocator figures.

``GpuCollector`` is a custom Prometheus collector: every scrape asks NVML (``pynvml``, from the optional
``nvidia-ml-py`` extra, imported here and nowhere else) for each device's utilization, memory,
temperature and power. ``load_nvml()`` returns ``None`` on a host without NVML (no package, no driver),
after one log line; the collector then exports nothing. Each value is read on its own, so a query a
device does not support (a MIG-enabled GPU answers ``NVML_ERROR_NOT_SUPPORTED`` for utilization, for
example) drops that value only. Torch's allocated and reserved CUDA memory come through an injected
callable, so that this module never imports torch.

Wiring: ``registry.register(GpuCollector(load_nvml(), cuda_memory=...))``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

CudaMemory = Callable[[], list[tuple[str, int, int]]]
"""Returns ``(device, allocated bytes, reserved bytes)`` per CUDA device, e.g. ``("cuda:0", 1024, 4096)``."""

DEVICE_LABELS = ("gpu", "name")
"""``gpu`` is the NVML index (as ``CUDA_VISIBLE_DEVICES`` numbers them without a mask), ``name`` the model."""
_TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU: the on-die sensor

_NVML_GAUGES: tuple[tuple[str, str, Callable[[Any, Any], float]], ...] = (
    (
        "ferry_gpu_utilization_ratio",
        "Fraction of the last sample period (1/6 s to 1 s) in which a kernel ran on the GPU, 0-1.",
        lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
    ),
    (
        "ferry_gpu_memory_used_bytes",
        "GPU memory in use by all processes.",
        lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).used,
    ),
    (
        "ferry_gpu_memory_total_bytes",
        "GPU memory installed.",
        lambda nvml, h: nvml.nvmlDeviceGetMemoryInfo(h).total,
    ),
    (
        "ferry_gpu_temperature_celsius",
        "GPU die temperature.",
        lambda nvml, h: nvml.nvmlDeviceGetTemperature(h, _TEMPERATURE_GPU),
    ),
    (
        "ferry_gpu_power_watts",
        "GPU power draw.",
        lambda nvml, h: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,  # milliwatts
    ),
)
_CUDA_GAUGES = (
    ("ferry_gpu_cuda_memory_allocated_bytes", "CUDA memory held by this process's torch tensors."),
    ("ferry_gpu_cuda_memory_reserved_bytes", "CUDA memory held by this process's torch caching allocator."),
)


def load_nvml() -> Any | None:
    """Import ``pynvml`` and initialise NVML; ``None`` where either fails. Logs one line either way."""
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        logger.info("GPU metrics off: pynvml is not installed (the 'gpu' extra installs it)")
        return None
    try:
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
    except nvml.NVMLError as exc:
        logger.info("GPU metrics off: NVML is unavailable (%s)", exc)
        return None
    logger.info("GPU metrics on: %d NVML device(s)", count)
    return nvml


class GpuCollector(Collector):
    """Per-device NVML gauges and torch's CUDA allocator gauges, read at each scrape.

    ``nvml`` is an initialised ``pynvml`` module (or a stand-in with the same functions and
    ``NVMLError``), or ``None`` for no NVML gauges. ``cuda_memory`` reports torch's allocator per
    device; ``None`` leaves those gauges out.
    """

    def __init__(self, nvml: Any | None, cuda_memory: CudaMemory | None = None) -> None:
        self._nvml = nvml
        self._cuda_memory = cuda_memory

    def describe(self) -> list[Metric]:
        """Every family this collector may export, without asking NVML (used at registration)."""
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        """Read every device now; yield only the families that got a value."""
        families = self._families()
        if self._nvml is not None:
            self._read_nvml(self._nvml, families[: len(_NVML_GAUGES)])
        if self._cuda_memory is not None:
            self._read_cuda(families[len(_NVML_GAUGES) :])
        yield from (family for family in families if family.samples)

    def close(self) -> None:
        """Shut NVML down; the NVML gauges are gone afterwards."""
        nvml, self._nvml = self._nvml, None
        if nvml is not None:
            try:
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                logger.debug("nvmlShutdown failed: %s", exc)

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        """Empty families: the NVML ones in ``_NVML_GAUGES`` order, then the CUDA ones."""
        nvml = [GaugeMetricFamily(name, doc, labels=DEVICE_LABELS) for name, doc, _ in _NVML_GAUGES]
        return nvml + [GaugeMetricFamily(name, doc, labels=("device",)) for name, doc in _CUDA_GAUGES]

    @staticmethod
    def _read_nvml(nvml: Any, families: list[GaugeMetricFamily]) -> None:
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            logger.debug("NVML device count failed: %s", exc)
            return
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
            except nvml.NVMLError as exc:
                logger.debug("NVML device %d skipped: %s", index, exc)
                continue
            labels = [str(index), name.decode() if isinstance(name, bytes) else str(name)]
            for family, (_, _, read) in zip(families, _NVML_GAUGES, strict=True):
                try:
                    value = float(read(nvml, handle))
                except nvml.NVMLError as exc:  # NOT_SUPPORTED (MIG), NO_PERMISSION, GPU_IS_LOST, ...
                    logger.debug("NVML %s of device %d skipped: %s", family.name, index, exc)
                    continue
                family.add_metric(labels, value)

    def _read_cuda(self, families: list[GaugeMetricFamily]) -> None:
        assert self._cuda_memory is not None
        try:
            devices = self._cuda_memory()
        except Exception:  # a scrape must not fail because of one source
            logger.warning("torch CUDA memory figures failed", exc_info=True)
            return
        allocated, reserved = families
        for device, allocated_bytes, reserved_bytes in devices:
            allocated.add_metric([device], float(allocated_bytes))
            reserved.add_metric([device], float(reserved_bytes))
