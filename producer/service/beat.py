"""`docbatch beat`: Celery beat with one schedule entry per inbox of the settings.

An inbox is a folder on the beat's own host, so its tick runs here, in the beat process (a thread per
running scan), rather than as a message some worker on another host would pick up without the folder.
The scheduler keeps its state in memory: a tick's work is decided by the SQL ledger and the folder, so a
restarted beat loses nothing by starting its timers afresh.
"""
from __future__ import annotations

import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from celery import Celery
from celery.beat import Scheduler
from celery.schedules import crontab, schedule

from producer.service.inbox import Scanner
from schemas.inboxes import InboxConfig, cron_fields

log = logging.getLogger(__name__)

SCAN_TASK = "docbatch.scan_inbox"  # the entries' task name; run in the beat process, never sent


def inbox_schedule(inbox: InboxConfig) -> schedule:
    """The inbox's Celery schedule: every `every_s` seconds, or its crontab (in the beat's time zone)."""
    if inbox.every_s is not None:
        return schedule(dt.timedelta(seconds=inbox.every_s))
    minute, hour, day_of_month, month, day_of_week = cron_fields(inbox.crontab, f"inbox {inbox.name!r}")
    return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month, day_of_week=day_of_week)


def beat_schedule(inboxes: tuple[InboxConfig, ...]) -> dict[str, dict[str, Any]]:
    """Celery's `beat_schedule` for the inboxes: entry `inbox:NAME` runs a scan of NAME."""
    return {inbox.batch_label: {"task": SCAN_TASK, "schedule": inbox_schedule(inbox), "args": (inbox.name,)}
            for inbox in inboxes}


class InboxScheduler(Scheduler):
    """Celery's in-memory scheduler, whose due inbox entries run a scan here instead of sending a message."""

    def __init__(self, *args, scanner: Scanner, **kwargs) -> None:
        self.scanner = scanner
        self.inboxes = {inbox.name: inbox for inbox in scanner.settings.inbox}
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.inboxes)), thread_name_prefix="docbatch-inbox")
        super().__init__(*args, **kwargs)

    def apply_entry(self, entry, producer=None) -> None:
        """Run a due inbox entry's scan in this process (Celery's own `apply_entry` would send a message)."""
        if entry.task != SCAN_TASK:
            super().apply_entry(entry, producer)
            return
        self._pool.submit(self.scanner.tick, self.inboxes[entry.args[0]])

    def close(self) -> None:
        """Let the running scans finish (each ends with the ledger and the folder in step), then stop."""
        self._pool.shutdown(wait=True)
        super().close()


def run_beat(app: Celery, scanner: Scanner) -> None:
    """Run beat until SIGINT or SIGTERM."""
    app.conf.beat_schedule = beat_schedule(scanner.settings.inbox)
    for inbox in scanner.settings.inbox:
        where = f"task file {inbox.task_file}" if inbox.task_file else f"task {inbox.task}"
        log.info("inbox %s: %s, %s, %s, then %s", inbox.name, inbox.folder, where, inbox.schedule_text, inbox.after)
    # Beat's own loop wakes at least this often; ticks shorter than a second are the tests' business.
    max_interval_s = min([5.0] + [inbox.every_s for inbox in scanner.settings.inbox if inbox.every_s])
    app.Beat(scheduler=partial(InboxScheduler, scanner=scanner), max_interval=max_interval_s,
             loglevel="INFO", quiet=True).run()
