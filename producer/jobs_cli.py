"""The `docbatch` commands that act on jobs already submitted: cancel, retry, and the workers holding them."""
from __future__ import annotations

import datetime as dt

import click
from rich.console import Console
from rich.table import Table

from schemas.messages import PREPARE_TASK, make_celery, send
from schemas.settings import Settings
from schemas.states import ErrorCode
from schemas.sql.store import Store

console = Console(stderr=True)


def _open(ctx: click.Context, batch: str | None = None) -> tuple[Settings, Store]:
    settings: Settings = ctx.obj
    store = Store(settings.effective_database_url, settings.blob_dir)
    store.migrate()
    if batch is not None and store.get_batch(batch) is None:
        raise click.ClickException(f"no batch {batch!r}")
    return settings, store


@click.command("cancel")
@click.argument("batch")
@click.pass_context
def cancel_command(ctx, batch) -> None:
    """Cancel BATCH's jobs that have not started: queued, being extracted, ready, and long documents waiting
    on their chunks. A job already running on a GPU worker finishes and keeps its answer. `docbatch retry
    BATCH` queues the cancelled jobs again."""
    _, store = _open(ctx, batch)
    cancelled, running = store.cancel_batch(batch)
    console.print(f"cancelled {cancelled} jobs of batch {batch}"
                  + (f"; {running} already running will finish" if running else ""))


@click.command("retry")
@click.argument("batch")
@click.option("--failed", "error_code", metavar="CODE", type=click.Choice([code.value for code in ErrorCode]),
              help="only the jobs that failed with this reason code "
              "(e.g. out_of_memory); without it, every failed and cancelled job")
@click.pass_context
def retry_command(ctx, batch, error_code) -> None:
    """Queue BATCH's failed (and cancelled) jobs again, attempts reset. Jobs done stay done; a long document
    keeps its finished chunks. Exit 3 when Redis is unreachable (the jobs are queued; a worker's sweep sends
    them once it is back)."""
    settings, store = _open(ctx, batch)
    jobs = store.retry_batch(batch, error_code)
    app = make_celery(settings)
    sent = sum(send(app, PREPARE_TASK, job.id, job.priority) for job in jobs)
    console.print(f"queued {len(jobs)} jobs of batch {batch} again" + ("" if sent == len(jobs) else
                  f"; {len(jobs) - sent} could not be sent now (Redis unreachable): the sweep sends them"))
    if sent < len(jobs):
        raise SystemExit(3)


@click.command("workers")
@click.option("--seen-within", "seen_within_s", type=float, default=60, show_default=True,
              help="list worker processes heard from within this many seconds")
@click.pass_context
def workers_command(ctx, seen_within_s) -> None:
    """The worker processes alive now (each renews its jobs' leases every few seconds), and how many jobs
    each holds."""
    _, store = _open(ctx)
    print_workers(store, seen_within_s, Console())


def print_workers(store: Store, seen_within_s: float, out: Console) -> None:
    rows = store.workers(seen_within_s)
    if not rows:
        out.print(f"no worker heard from in the last {seen_within_s:.0f} s")
        return
    table = Table("worker", "role", "pid", "host", "holds", "heartbeat", "up since")
    now = dt.datetime.now(dt.timezone.utc)
    for worker, held in rows:
        beat = worker.heartbeat_at
        beat = beat if beat.tzinfo else beat.replace(tzinfo=dt.timezone.utc)
        table.add_row(worker.name, worker.role, str(worker.pid), worker.host, str(held),
                      f"{(now - beat).total_seconds():.0f} s ago", worker.started_at.strftime("%Y-%m-%d %H:%M:%S"))
    out.print(table)


COMMANDS = [cancel_command, retry_command, workers_command]
