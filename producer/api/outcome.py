"""An API batch's progress and end: counts from its jobs, its window, and its output and error files.

`advance` is what a `retrieve` and the sweeper call: it recounts a batch whose counts are older than `api_refresh_s`
(one aggregate over its jobs, cached on its row; one caller per interval wins the recount), ends the window of one
past `expires_at` (its jobs not started are cancelled with reason code `expired`), and once no job is left
unfinished writes the output files and moves the batch to its end. Each move is a compare-and-set and finalizing is
leased, so any API process may call it.
"""
from __future__ import annotations

import datetime as dt
import logging
import tempfile
from typing import IO, Iterator

from producer.api.context import ApiContext
from producer.intake.openai_batch import render_openai
from schemas.records import JobRecord
from schemas.sql.api_batches import ENDED, RequestCounts
from schemas.sql.api_files import CHUNK_BYTES
from schemas.sql.models import ApiBatch, utcnow
from schemas.states import ErrorCode, JobState

log = logging.getLogger(__name__)
FINALIZE_LEASE_S = 300
ROWS_PER_PAGE = 1000
SPOOL_BYTES = 1 << 20


def advance(ctx: ApiContext, row: ApiBatch) -> ApiBatch:
    """Move the batch on as far as its jobs allow; returns it as it is now (`row` itself when nothing was due, so a
    `retrieve` between recounts reads one row and writes none)."""
    if row.status in ENDED or row.status == "validating":
        return row
    now = utcnow()
    changed = row.status == "in_progress" and now >= _aware(row.expires_at) and _end_window(ctx, row, now)
    stale_before = now - dt.timedelta(seconds=ctx.settings.api_refresh_s)
    stale = row.counted_at is None or _aware(row.counted_at) < stale_before
    if row.status != "in_progress" or (stale and ctx.store.claim_recount(row.id, now, stale_before)):
        counts = ctx.store.count_requests(row.id)
        ctx.store.save_counts(row.id, counts, now)
        if counts.unfinished and row.status in ("cancelling", "finalizing") and row.end_status != "completed":
            _cancel_again(ctx, row)
        if counts.unfinished == 0:
            ctx.store.move_api_batch(row.id, ["in_progress"], status="finalizing", finalizing_at=now,
                                     end_status="completed")
            _finalize(ctx, row.id)
        changed = True
    return ctx.store.get_api_batch(row.key_id, row.id) if changed else row


def _end_window(ctx: ApiContext, row: ApiBatch, now: dt.datetime) -> bool:
    """The window ended: the jobs not started are cancelled (`expired`) and the batch finalizes. True if this call
    ended it."""
    if not ctx.store.move_api_batch(row.id, ["in_progress"], status="finalizing", finalizing_at=now,
                                    end_status="expired"):
        return False
    done = ctx.store.cancel_batch(row.id, ErrorCode.EXPIRED, _expired_message(row))
    log.info("batch %s expired: %d requests cancelled, %d held by workers told to stop (those being generated "
             "finish)", row.id, done.cancelled, len(done.held))
    return True


def _cancel_again(ctx: ApiContext, row: ApiBatch) -> None:
    """A job that was running when its batch was cancelled or expired, and came back (its worker died), must not
    start again: cancel what has not started once more."""
    if row.end_status == "expired":
        ctx.store.cancel_batch(row.id, ErrorCode.EXPIRED, _expired_message(row))
    else:
        ctx.store.cancel_batch(row.id)


def _expired_message(row: ApiBatch) -> str:
    return f"the batch's completion window of {row.completion_window} ended before this request ran"


def _finalize(ctx: ApiContext, batch_id: str) -> None:
    """Write the output and error files and end the batch, if every job has ended and no process is at it."""
    row = ctx.store.lease_api_batch(batch_id, ["finalizing", "cancelling"], ctx.owner, FINALIZE_LEASE_S)
    if row is None:
        return
    if ctx.store.count_requests(batch_id).unfinished:  # cancelling, with jobs still running
        ctx.store.move_api_batch(batch_id, ["finalizing", "cancelling"], owner=ctx.owner, lease_owner=None,
                                 lease_until=None)
        return
    end_status = "cancelled" if row.status == "cancelling" else (row.end_status or "completed")
    with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as output, tempfile.SpooledTemporaryFile(SPOOL_BYTES) as errors:
        _write_lines(ctx, batch_id, output, errors)
        counts: RequestCounts = ctx.store.count_requests(batch_id)
        files = {column: (f"batch_{batch_id}_{kind}.jsonl", _parts(spool))
                 for column, kind, spool in (("output_file_id", "output", output), ("error_file_id", "error", errors))
                 if spool.tell()}
        for spool in (output, errors):
            spool.seek(0)
        expires_at = utcnow() + dt.timedelta(seconds=row.output_expires_s)
        if ctx.store.end_api_batch(batch_id, ctx.owner, end_status, counts, files, row.key_id, expires_at):
            log.info("batch %s %s: %d completed, %d failed", batch_id, end_status, counts.completed, counts.failed)


def _write_lines(ctx: ApiContext, batch_id: str, output: IO[bytes], errors: IO[bytes]) -> None:
    """Each request's line as `docbatch results --format openai` writes it: done ones to `output`, the others
    (failed, cancelled, expired, rejected at intake) to `errors`."""
    after = None
    while rows := ctx.store.batch_rows(batch_id, after=after, limit=ROWS_PER_PAGE):
        for item, job, result in rows:
            record = JobRecord.from_row(item, job, result)
            (output if record.state == JobState.DONE else errors).write(render_openai([record]).encode())
        after = rows[-1][0].name
    batch = ctx.store.get_batch(batch_id)
    for reject in ctx.store.batch_rejects(batch_id):
        errors.write(render_openai([JobRecord.from_reject(reject, batch.task, batch.model)]).encode())


def _parts(spool: IO[bytes]) -> Iterator[bytes]:
    while data := spool.read(CHUNK_BYTES):
        yield data


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite gives back naive times (stored in UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
