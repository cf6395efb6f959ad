"""`--wait`: a live progress bar over a batch until every job has ended."""
from __future__ import annotations

import time
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from schemas.records import BatchStatus
from schemas.store import Store


def batch_status(store: Store, batch_id: str) -> BatchStatus:
    return BatchStatus.from_counts(batch_id, store.batch_counts(batch_id))


def wait_for_batch(store: Store, batch_id: str, *, console: Console | None = None, poll_s: float = 0.5,
                   check_alive: Callable[[], None] = lambda: None, timeout_s: float | None = None) -> BatchStatus:
    """Poll the store until the batch is finished, drawing done/failed/running, docs/s and ETA.

    `check_alive` is called each poll and may raise to abandon the wait (e.g. the local worker died);
    past `timeout_s` a `TimeoutError` is raised (the jobs go on).
    """
    console = console or Console(stderr=True)
    status = batch_status(store, batch_id)
    started, first_finished = time.monotonic(), status.finished
    # The bar counts units of work: documents, plus the chunks of long documents as they appear.
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("done {task.fields[done]} failed {task.fields[failed]} running {task.fields[running]}"),
               TextColumn("{task.fields[rate]:.2f} docs/s"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        finished_units, total_units = store.unit_counts(batch_id)
        bar = progress.add_task(f"batch {batch_id[:8]}", total=total_units, completed=finished_units,
                                done=status.done, failed=status.failed, running=status.running, rate=0.0)
        while not status.is_finished:
            check_alive()
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise TimeoutError(f"batch {batch_id} not finished after {timeout_s:.0f} s: {status}")
            time.sleep(poll_s)
            status = batch_status(store, batch_id)
            finished_units, total_units = store.unit_counts(batch_id)
            rate = (status.finished - first_finished) / max(time.monotonic() - started, 1e-6)
            progress.update(bar, completed=finished_units, total=total_units, done=status.done, failed=status.failed,
                            running=status.running + status.preparing + status.ready, rate=rate)
    return status
