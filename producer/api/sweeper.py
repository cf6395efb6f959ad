"""The sweeper: a thread in every API process that moves batches on even when nobody polls them.

Every `api_sweep_interval_s` it purges the content of expired files, takes in `validating` batches whose intake
lease has lapsed (their process died), and calls `outcome.advance` on batches whose window ended, whose counts are
stale, or that are finalizing. Every step is leased or a compare-and-set in the store, so several API processes
sweep side by side without doing anything twice.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import traceback

from sqlalchemy.exc import DBAPIError

from producer.api.context import ApiContext
from producer.api.intake import run_intake
from producer.api.outcome import advance
from schemas.sql.models import utcnow

log = logging.getLogger(__name__)


class Sweeper(threading.Thread):
    def __init__(self, ctx: ApiContext) -> None:
        super().__init__(name="api-sweeper", daemon=True)
        self.ctx = ctx
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.ctx.settings.api_sweep_interval_s):
            try:
                self.sweep()
            except DBAPIError as e:  # the database is away: the next sweep tries again
                log.warning("sweep skipped: database error %s", type(e).__name__)
            except Exception as e:  # noqa: BLE001: one bad sweep must not end the thread; the next one retries
                log.error("sweep failed: %s\n%s", type(e).__name__, "".join(traceback.format_tb(e.__traceback__)))

    def sweep(self) -> None:
        now = utcnow()
        purged = self.ctx.store.expire_api_files(now)
        if purged:
            log.info("purged the content of %d expired files", purged)
        stale_before = now - dt.timedelta(seconds=self.ctx.settings.api_refresh_s)
        for row in self.ctx.store.due_api_batches(now, stale_before):
            if row.status == "validating":
                run_intake(self.ctx, row.id)
            else:
                advance(self.ctx, row)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
