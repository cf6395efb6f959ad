"""The `docbatch` commands that act on jobs already submitted: cancel, retry, and the workers holding them.
Every id they take may be shortened to any unique prefix of at least 6 characters (`resolve`)."""
from __future__ import annotations

import datetime as dt

import click
from rich.console import Console
from rich.table import Table

from schemas.messages import CANCELLED, FINISHING, PREPARE_TASK, announce_cancel, make_celery, send
from schemas.settings import Settings
from schemas.sql.control import Cancellation
from schemas.states import ErrorCode, JobState
from schemas.sql.store import Store

console = Console(stderr=True, soft_wrap=True)  # a line a log or a script can match whole


def resolve(store: Store, text: str, kinds: tuple[str, ...] = ("batch",)) -> tuple[str, str]:
    """(kind, whole id) for an id or unique prefix the user typed, or a usage error that says what matched."""
    try:
        return store.resolve_id(text, kinds)
    except LookupError as e:
        raise click.ClickException(str(e)) from e


def _open(ctx: click.Context, batch: str | None = None) -> tuple[Settings, Store, str | None]:
    """The settings, the store, and the whole id of `batch` (given as an id or a unique prefix)."""
    settings: Settings = ctx.obj
    store = Store(settings.effective_database_url, settings.blob_dir)
    store.migrate()
    return settings, store, resolve(store, batch)[1] if batch is not None else None


@click.command("cancel")
@click.argument("batch_or_job")
@click.option("--now", is_flag=True, help="also stop the jobs whose answers are being generated")
@click.pass_context
def cancel_command(ctx, batch_or_job, now) -> None:
    """Cancel a batch's jobs (or one document's job) that have not started: queued, being extracted, ready,
    waiting in a worker's engine, and long documents waiting on their chunks. A job whose answer is being
    generated finishes and keeps its answer, unless --now. `docbatch retry BATCH` queues the cancelled jobs
    again."""
    settings, store, _ = _open(ctx)
    kind, target = resolve(store, batch_or_job, ("batch", "job"))
    done = store.cancel_batch(target, now=now) if kind == "batch" else store.cancel_job(target, now=now)
    outcomes = {}
    if done.held:
        num_workers = len({worker.name for worker, _ in store.workers(seen_within_s=60)})
        outcomes = announce_cancel(make_celery(settings), done.held, now, num_workers=num_workers) or {}
        # a held job no worker answered for may have ended meanwhile (its worker's keeper saw the stop first)
        ended = store.job_states(job_id for job_id in done.held if job_id not in outcomes)
        outcomes.update({job_id: {JobState.DONE: FINISHING, JobState.CANCELLED: CANCELLED}.get(state, "ended")
                         for job_id, state in ended.items() if state != JobState.RUNNING})
    console.print(cancel_report(done, outcomes, f"{kind} {target}", settings.renew_every_s), highlight=False)


def cancel_report(done: Cancellation, outcomes: dict[str, str], what: str, renew_every_s: float) -> str:
    """What a cancel did, in words: jobs cancelled at once, those the workers stopped in their engines, those
    that will finish, and those whose workers did not answer (`outcomes`: job id -> what its worker said)."""
    stopped = sum(outcomes.get(job_id) == CANCELLED for job_id in done.held)
    finishing = sum(outcomes.get(job_id) == FINISHING for job_id in done.held)
    unanswered = sum(job_id not in outcomes for job_id in done.held)
    cancelled = done.cancelled + stopped
    line = f"cancelled {cancelled} job{'' if cancelled == 1 else 's'} of {what}"
    if stopped:
        line += (f" ({stopped} of them held by a worker, stopped in its engine"
                 + (")" if done.now else " before it started them)"))
    if finishing:
        line += (f"; {finishing} whose answers are being generated will finish"
                 + ("" if done.now else " (cancel --now stops them too)"))
    if unanswered:
        line += (f"; {unanswered} held by workers that did not answer now: they stop within {renew_every_s:.0f} s, "
                 "at their workers' next lease renewal" + ("" if done.now else ", unless their answers are being "
                                                           "generated"))
    return line


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
    settings, store, batch = _open(ctx, batch)
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
    _, store, _ = _open(ctx)
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
