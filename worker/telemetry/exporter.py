"""A worker process's telemetry: its Prometheus endpoint, its GPU readings and its alert loop.

`start_telemetry` runs once in the worker's main process, before Celery forks any pool child. It points
prometheus-client at a multiprocess folder of its own (`HOME/metrics/NAME`, emptied at start) so that the
job counters of prefork children add up, serves `/metrics` on `metrics_port`, and checks the alert
thresholds every `alert_interval_s` in a daemon thread. Telemetry never stops a worker: a port in use is
logged and the worker runs on without an endpoint.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from celery.worker import state as worker_state
from celery.worker.control import inspect_command

from schemas.settings import Settings
from worker.telemetry.alerts import AlertMonitor, Snapshot, Thresholds

log = logging.getLogger(__name__)


@dataclass
class Telemetry:
    """What one worker process exports; `url` is its metrics endpoint, None when it has none."""

    settings: Settings
    role: str
    name: str
    url: str | None
    registry: Any  # prometheus_client.CollectorRegistry: everything /metrics shows
    jobs: Any  # the MultiProcessCollector within it: the job metrics of this process and its children
    monitor: Any  # worker.telemetry.gpu_monitor.GpuMonitor or None
    alerts: AlertMonitor


_current: Telemetry | None = None


def start_telemetry(settings: Settings, role: str, name: str) -> Telemetry:
    """Set up metrics, GPU readings and alerts for this worker process (see the module's docstring)."""
    global _current
    _use_multiprocess_folder(settings.home / "metrics" / name)
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from worker.telemetry import metrics
    from worker.telemetry.engine_metrics import EngineCollector
    from worker.telemetry.gpu_monitor import GpuCollector, GpuMonitor

    metrics.observe_tasks()
    registry = CollectorRegistry()
    jobs = MultiProcessCollector(registry)
    registry.register(EngineCollector(_engine_stats))
    monitor = GpuMonitor.open(os.environ.get("CUDA_VISIBLE_DEVICES")) if role == "infer" else None
    if monitor is not None:
        registry.register(GpuCollector(monitor))
    alerts = AlertMonitor(Thresholds.from_settings(settings))
    registry.register(_WorkerCollector(settings, role, name, alerts))
    _current = Telemetry(settings, role, name, _serve(settings, registry), registry, jobs, monitor, alerts)
    threading.Thread(target=_alert_loop, args=(_current,), name="docbatch-alerts", daemon=True).start()
    return _current


def _use_multiprocess_folder(folder) -> None:
    """prometheus-client picks its value store when first imported; set the folder, then make sure it is used."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)  # read by prometheus-client, here and in the children
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def _serve(settings: Settings, registry) -> str | None:
    from prometheus_client import start_http_server

    if not settings.metrics_port:
        return None
    try:
        start_http_server(settings.metrics_port, addr=settings.metrics_address, registry=registry)
    except OSError as e:
        log.error("metrics port %s:%d: %s; this worker runs on without a metrics endpoint",
                  settings.metrics_address, settings.metrics_port, e)
        return None
    host = socket.gethostname() if settings.metrics_address in ("0.0.0.0", "::", "") else settings.metrics_address
    url = f"http://{host}:{settings.metrics_port}/metrics"
    log.info("metrics at %s", url)
    return url


def _engine_stats() -> Any:
    from worker.service import runtime

    try:
        engine = runtime.current().engine
    except RuntimeError:
        return None
    return getattr(engine, "stats", None)


def snapshot(telemetry: Telemetry) -> Snapshot:
    """This worker's readings now: jobs ended (children included), jobs held, engine steps, GPUs."""
    totals = {"docbatch_jobs_done_total": 0.0, "docbatch_jobs_failed_total": 0.0}
    for family in telemetry.jobs.collect():
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    steps = getattr(_engine_stats(), "num_steps", None)
    return Snapshot(at_s=time.monotonic(), jobs_done=totals["docbatch_jobs_done_total"],
                    jobs_failed=totals["docbatch_jobs_failed_total"], jobs_held=len(worker_state.reserved_requests),
                    engine_steps=steps, gpus=telemetry.monitor.read() if telemetry.monitor else ())


def _alert_loop(telemetry: Telemetry) -> None:
    while True:
        try:
            started, ended = telemetry.alerts.update(snapshot(telemetry))
        except Exception:  # noqa: BLE001 - a failed reading is tried again next period; alerts must not stop
            log.exception("alert check failed")
            started, ended = [], []
        for alert in started:
            log.warning("ALERT %s (%s): %s", alert.name, alert.subject, alert.message)
        for alert in ended:
            log.info("alert %s (%s) ended", alert.name, alert.subject)
        time.sleep(telemetry.settings.alert_interval_s)


class _WorkerCollector:
    """Who this worker is, what it holds now, and which alerts fire (1) or are armed (0)."""

    ALERTS = ("gpu_memory", "gpu_temperature", "stalled", "failure_rate")

    def __init__(self, settings: Settings, role: str, name: str, alerts: AlertMonitor) -> None:
        self._info = {"worker": name, "role": role, "model": settings.model}
        self._alerts = alerts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        yield InfoMetricFamily("docbatch_worker", "this worker", value=self._info)
        yield GaugeMetricFamily("docbatch_worker_jobs_held", "jobs running or prefetched by this worker",
                                value=len(worker_state.reserved_requests))
        gauge = GaugeMetricFamily("docbatch_alert", "1 while the alert fires", labels=["alert", "subject"])
        firing = dict(self._alerts.firing)
        for name in self.ALERTS:
            if not any(key[0] == name for key in firing):
                gauge.add_metric([name, ""], 0)
        for alert_name, subject in firing:
            gauge.add_metric([alert_name, subject], 1)
        yield gauge


@inspect_command()
def docbatch_telemetry(state) -> dict[str, Any]:
    """`celery -A worker.celery_app inspect docbatch_telemetry`: this worker's role, metrics endpoint, queues and
    the documents it runs now (what `docbatch top` shows of each worker)."""
    telemetry = _current
    active = list(worker_state.active_requests)
    return {"role": telemetry.role if telemetry else None, "metrics_url": telemetry.url if telemetry else None,
            "queues": sorted(queue.name for queue in state.consumer.task_consumer.queues),
            "held": len(worker_state.reserved_requests), "active": len(active),
            "running": sorted(str((request.kwargs or {}).get("name") or request.id) for request in active)[:5]}
