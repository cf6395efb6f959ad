"""Alert rules over a worker's own readings: pure, so they are tested without a GPU or a clock.

A worker takes a `Snapshot` every `alert_interval_s` and hands it to `AlertMonitor.update`, which says
which alerts started and which ended. The telemetry loop logs a warning for each that starts and exports
every firing one as `docbatch_alert{alert, subject} 1`.

Rules (thresholds from the settings):
- `gpu_memory`: a GPU's used memory over its total is above `alert_gpu_memory_share`;
- `gpu_temperature`: a GPU is hotter than `alert_gpu_temperature_c`;
- `stalled`: the worker holds jobs (running or prefetched) and none has ended, nor has the engine stepped,
  for `alert_stall_s`;
- `failure_rate`: of the jobs this worker ended in the last `alert_failure_window_s` (at least
  `alert_failure_min_jobs` of them), the failed share is above `alert_failure_rate`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from schemas.settings import Settings


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML reads it; `index` is NVML's (nvidia-smi's) index."""

    index: int
    name: str
    uuid: str
    utilization_ratio: float | None  # share of the last sample period a kernel ran, 0..1
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_c: float | None
    power_w: float | None


@dataclass(frozen=True)
class Snapshot:
    at_s: float  # a monotonic clock
    jobs_done: float  # ended by this worker since it started
    jobs_failed: float
    jobs_held: int  # running or prefetched by this worker now
    engine_steps: float | None  # None where the engine does not count its steps
    gpus: tuple[GpuReading, ...] = ()


@dataclass(frozen=True)
class Thresholds:
    gpu_memory_share: float
    gpu_temperature_c: float
    stall_s: float
    failure_rate: float
    failure_window_s: float
    failure_min_jobs: int

    @classmethod
    def from_settings(cls, s: Settings) -> "Thresholds":
        return cls(s.alert_gpu_memory_share, s.alert_gpu_temperature_c, s.alert_stall_s, s.alert_failure_rate,
                   s.alert_failure_window_s, s.alert_failure_min_jobs)


@dataclass(frozen=True)
class Alert:
    name: str  # gpu_memory, gpu_temperature, stalled, failure_rate
    subject: str  # gpu0, gpu1, ... or worker
    message: str

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.subject


class AlertMonitor:
    """Keeps what the rules need between snapshots (the failure window, the last progress) and the firing set."""

    def __init__(self, thresholds: Thresholds) -> None:
        self.thresholds = thresholds
        self.firing: dict[tuple[str, str], Alert] = {}
        self._history: deque[Snapshot] = deque()
        self._progress: float | None = None
        self._progress_at_s = 0.0

    def update(self, snap: Snapshot) -> tuple[list[Alert], list[Alert]]:
        """Evaluate every rule on `snap`; returns (alerts that started, alerts that ended)."""
        now_firing = {alert.key: alert for alert in [*self._gpu_alerts(snap), *self._stall(snap),
                                                      *self._failure_rate(snap)]}
        started = [alert for key, alert in now_firing.items() if key not in self.firing]
        ended = [alert for key, alert in self.firing.items() if key not in now_firing]
        self.firing = now_firing
        return started, ended

    def _gpu_alerts(self, snap: Snapshot) -> list[Alert]:
        t = self.thresholds
        alerts = []
        for gpu in snap.gpus:
            share = gpu.memory_used_bytes / gpu.memory_total_bytes if gpu.memory_total_bytes else 0.0
            if share > t.gpu_memory_share:
                alerts.append(Alert("gpu_memory", f"gpu{gpu.index}", f"GPU {gpu.index} ({gpu.name}) memory "
                                    f"{share:.0%} used, above {t.gpu_memory_share:.0%}"))
            if gpu.temperature_c is not None and gpu.temperature_c > t.gpu_temperature_c:
                alerts.append(Alert("gpu_temperature", f"gpu{gpu.index}", f"GPU {gpu.index} ({gpu.name}) at "
                                    f"{gpu.temperature_c:.0f} C, above {t.gpu_temperature_c:.0f} C"))
        return alerts

    def _stall(self, snap: Snapshot) -> list[Alert]:
        """Progress is a job ending or an engine step; holding no job is idle, not stalled."""
        progress = snap.jobs_done + snap.jobs_failed + (snap.engine_steps or 0)
        if snap.jobs_held == 0 or progress != self._progress:
            self._progress, self._progress_at_s = progress, snap.at_s
            return []
        idle_s = snap.at_s - self._progress_at_s
        if idle_s < self.thresholds.stall_s:
            return []
        return [Alert("stalled", "worker", f"{snap.jobs_held} jobs held and no progress for {idle_s:.0f} s "
                                           f"(alert_stall_s {self.thresholds.stall_s:g})")]

    def _failure_rate(self, snap: Snapshot) -> list[Alert]:
        """The failed share over the window: the newest snapshot against the oldest one still inside it."""
        t = self.thresholds
        self._history.append(snap)
        while len(self._history) > 1 and self._history[1].at_s <= snap.at_s - t.failure_window_s:
            self._history.popleft()
        base = self._history[0]
        failed = snap.jobs_failed - base.jobs_failed
        ended = failed + snap.jobs_done - base.jobs_done
        if ended < t.failure_min_jobs or failed / ended <= t.failure_rate:
            return []
        return [Alert("failure_rate", "worker", f"{failed:.0f} of the {ended:.0f} jobs ended in the last "
                                                f"{t.failure_window_s:g} s failed ({failed / ended:.0%}, above "
                                                f"{t.failure_rate:.0%})")]
