"""`docbatch top`: a live view of workers, GPUs, queues and batches (`producer.service.top_data` gathers it)."""
from __future__ import annotations

import time

import redis
from celery import Celery
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from producer.service.top_data import TopData, gather
from schemas.sql.store import Store

GIB = 1024**3


def _number(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def workers_table(data: TopData) -> Table:
    table = Table("worker", "role", "queues", "running", "held", "done", "failed", "tok/s out", "alerts",
                  title="workers", title_justify="left")
    for w in data.workers:
        running = ", ".join(w.info.get("running") or []) or "-"
        alerts = ", ".join(w.alerts) or ("-" if w.scrape_error is None else f"[dim]{w.scrape_error}[/]")
        table.add_row(w.name, str(w.info.get("role") or "-"), ",".join(w.info.get("queues") or []), running,
                      str(w.info.get("held", "-")), _number(w.jobs_done), _number(w.jobs_failed),
                      _number(w.tokens_out_per_s, ".1f"), f"[red]{alerts}[/]" if w.alerts else alerts)
    if not data.workers:
        table.add_row("[yellow]no worker answered[/]", *[""] * 8)
    return table


def gpus_table(data: TopData) -> Table | None:
    table = Table("worker", "gpu", "util", "memory", "temp", "power", title="GPUs", title_justify="left")
    for w in data.workers:
        for index, gpu in sorted(w.gpus.items()):
            used, capacity = gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")
            memory = f"{used / GIB:.1f} / {capacity / GIB:.1f} GiB" if used is not None and capacity else "-"
            utilization = gpu.get("utilization_ratio")
            table.add_row(w.name, index, _number(None if utilization is None else 100 * utilization) + "%", memory,
                          _number(gpu.get("temperature_celsius")) + " C", _number(gpu.get("power_watts")) + " W")
    return table if table.row_count else None


def queues_table(data: TopData) -> Table:
    table = Table("queue", "waiting", title="queues", title_justify="left")
    for queue, count in data.queues.items():
        table.add_row(queue if queue != "unacked" else "delivered, not acked", str(count))
    return table


def batches_table(data: TopData) -> Table:
    table = Table("batch", "label", "task", "progress", "done", "failed", "running", "total",
                  title="newest batches", title_justify="left")
    for b in data.batches:
        s = b.status
        progress = f"{b.units_finished}/{b.units_total}" + (" ✓" if s.is_finished else "")
        table.add_row(s.batch[:12], b.label or "-", b.task, progress, str(s.done), str(s.failed),
                      str(s.running + s.ready + s.preparing), str(s.total))
    return table


def render(data: TopData) -> Group:
    tables = [workers_table(data), gpus_table(data), queues_table(data), batches_table(data)]
    return Group(*[table for table in tables if table is not None])


def run_top(app: Celery, client: redis.Redis, store: Store, *, once: bool, interval_s: float,
            console: Console) -> None:
    """Draw the view once (`once`), or redraw it every `interval_s` until Ctrl-C."""
    data = gather(app, client, store, now_s=time.monotonic())
    if once:
        console.print(render(data))
        return
    with Live(render(data), console=console, screen=False, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval_s)
                data = gather(app, client, store, now_s=time.monotonic(), previous=data)
                live.update(render(data), refresh=True)
        except KeyboardInterrupt:
            pass
