"""GPU telemetry through NVML (nvidia-ml-py): utilisation, memory, temperature and power of the GPUs this
process may use, as `GpuReading`s and as Prometheus gauges.

No NVIDIA driver, or a process whose GPUs are hidden (`CUDA_VISIBLE_DEVICES=""`, a CPU worker), means no
monitor at all: the GPU series are then absent, never zero.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import pynvml
from prometheus_client.core import GaugeMetricFamily

from worker.telemetry.alerts import GpuReading

log = logging.getLogger(__name__)


class GpuMonitor:
    """Reads the GPUs named by a `CUDA_VISIBLE_DEVICES` value (NVML indices or `GPU-` UUIDs).

    NVML numbers GPUs as nvidia-smi does (PCI bus order), whatever CUDA_VISIBLE_DEVICES says, so each entry
    is looked up by itself; the launcher writes nvidia-smi's indices there.
    """

    def __init__(self, handles: list[tuple[int, Any]]) -> None:
        self._handles = handles  # (NVML index, handle)

    @classmethod
    def open(cls, cuda_visible_devices: str | None) -> "GpuMonitor | None":
        """A monitor of the visible GPUs, or None when there is none to read (CPU worker, no driver)."""
        if cuda_visible_devices is not None and not cuda_visible_devices.strip():
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            log.info("no GPU telemetry: NVML is not available (%s)", e)
            return None
        if cuda_visible_devices is None:
            entries = [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        else:
            entries = [entry.strip() for entry in cuda_visible_devices.split(",")]
        handles = []
        for entry in entries:
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(entry))
            handles.append((pynvml.nvmlDeviceGetIndex(handle), handle))
        return cls(handles) if handles else None

    def read(self) -> tuple[GpuReading, ...]:
        return tuple(_read(index, handle) for index, handle in self._handles)


def _optional(read, *args) -> Any:
    """A reading some boards do not support (power on some, temperature under MIG): None then."""
    try:
        return read(*args)
    except pynvml.NVMLError_NotSupported:
        return None


def _read(index: int, handle: Any) -> GpuReading:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)  # bytes
    utilization = _optional(pynvml.nvmlDeviceGetUtilizationRates, handle)  # percent over the last sample period
    power_mw = _optional(pynvml.nvmlDeviceGetPowerUsage, handle)  # milliwatts
    return GpuReading(
        index=index, name=pynvml.nvmlDeviceGetName(handle), uuid=pynvml.nvmlDeviceGetUUID(handle),
        utilization_ratio=None if utilization is None else utilization.gpu / 100,
        memory_used_bytes=memory.used, memory_total_bytes=memory.total,
        temperature_c=_optional(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU),
        power_w=None if power_mw is None else power_mw / 1000)


# GpuReading field -> (metric name, help)
GPU_GAUGES = {
    "utilization_ratio": ("docbatch_gpu_utilization_ratio", "share of the last sample period a kernel ran"),
    "memory_used_bytes": ("docbatch_gpu_memory_used_bytes", "GPU memory in use"),
    "memory_total_bytes": ("docbatch_gpu_memory_total_bytes", "GPU memory"),
    "temperature_c": ("docbatch_gpu_temperature_celsius", "GPU temperature"),
    "power_w": ("docbatch_gpu_power_watts", "GPU power draw"),
}


class GpuCollector:
    """Prometheus collector: one reading of every GPU per scrape."""

    def __init__(self, monitor: GpuMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {field: GaugeMetricFamily(name, documentation, labels=["gpu", "uuid", "name"])
                    for field, (name, documentation) in GPU_GAUGES.items()}
        for reading in self.monitor.read():
            label_values = [str(reading.index), reading.uuid, reading.name]
            for field, family in families.items():
                value = getattr(reading, field)
                if value is not None:
                    family.add_metric(label_values, value)
        yield from families.values()
