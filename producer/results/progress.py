"""`--wait`: progress over a batch until every job has ended (a live bar, or plain lines for a log)."""
from __future__ import annotations

import time
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from schemas.records import BatchStatus
from schemas.sql.store import Store

PLAIN_EVERY_S = 10


def batch_status(store: Store, batch_id: str) -> BatchStatus:
    return BatchStatus.from_counts(batch_id, store.batch_counts(batch_id))


def wait_for_batch(store: Store, batch_id: str, *, console: Console | None = None, poll_s: float = 0.5,
                   check_alive: Callable[[], None] = lambda: None, timeout_s: float | None = None) -> BatchStatus:
    """Poll the store until the batch is finished, drawing done/failed/running, docs/s and ETA: a live bar
    on a terminal, else a plain line every `PLAIN_EVERY_S` seconds (and the last one), which a log keeps.

    `check_alive` is called each poll and may raise to abandon the wait (e.g. the local worker died);
    past `timeout_s` a `TimeoutError` is raised (the jobs go on).
    """
    console = console or Console(stderr=True)
    if not console.is_terminal:
        return _poll(store, batch_id, poll_s, check_alive, timeout_s, _PlainLines(console, batch_id))
    # The bar counts units of work: documents, plus the chunks of long documents as they appear.
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("done {task.fields[done]} failed {task.fields[failed]} running {task.fields[running]}"),
               TextColumn("{task.fields[rate]:.2f} docs/s"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"batch {batch_id[:8]}", total=None, done=0, failed=0, running=0, rate=0.0)

        def draw(status: BatchStatus, finished_units: int, total_units: int, rate: float) -> None:
            progress.update(bar, completed=finished_units, total=total_units, done=status.done, failed=status.failed,
                            running=_running(status), rate=rate)

        return _poll(store, batch_id, poll_s, check_alive, timeout_s, draw)


def _running(status: BatchStatus) -> int:
    return status.running + status.preparing + status.ready + status.waiting


class _PlainLines:
    """Progress as plain lines: at the start, every PLAIN_EVERY_S seconds, and at the end."""

    def __init__(self, console: Console, batch_id: str) -> None:
        self.console, self.batch_id, self.printed_at = console, batch_id, None

    def __call__(self, status: BatchStatus, finished_units: int, total_units: int, rate: float) -> None:
        now = time.monotonic()
        if self.printed_at is not None and now - self.printed_at < PLAIN_EVERY_S and not status.is_finished:
            return
        self.printed_at = now
        self.console.print(f"batch {self.batch_id[:8]}: {finished_units}/{total_units} finished (done {status.done}, "
                           f"failed {status.failed}, running {_running(status)}), {rate:.2f} docs/s", highlight=False)


def _poll(store: Store, batch_id: str, poll_s: float, check_alive: Callable[[], None], timeout_s: float | None,
          draw: Callable[[BatchStatus, int, int, float], None]) -> BatchStatus:
    status = batch_status(store, batch_id)
    started, first_finished = time.monotonic(), status.finished
    draw(status, *store.unit_counts(batch_id), 0.0)
    while not status.is_finished:
        check_alive()
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise TimeoutError(f"batch {batch_id} not finished after {timeout_s:.0f} s: {status}")
        time.sleep(poll_s)
        status = batch_status(store, batch_id)
        rate = (status.finished - first_finished) / max(time.monotonic() - started, 1e-6)
        draw(status, *store.unit_counts(batch_id), rate)
    return status
