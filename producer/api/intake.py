"""Intake: a `validating` API batch's input file becomes a docbatch batch of the same id, then `in_progress`.

The file is read part by part and line by line; each line is parsed as `docbatch submit --openai-batch` parses it
(`producer.intake.openai_batch`), its document stored in bulk. A line that cannot run fails alone
(`invalid_request`, with its line number); a file that is not UTF-8 JSON lines, has no runnable line, repeats a
custom_id or holds more than `api_max_requests` lines fails the batch, with `errors` naming the lines. The batch is
leased to this process for INTAKE_LEASE_S, and `Store.create_batch` is given the batch's id, so an intake taken
over from a process that died never makes a second batch.
"""
from __future__ import annotations

import codecs
import contextlib
import logging
import traceback
from typing import Any, Iterator

from producer.api.context import ApiContext
from producer.intake.openai_batch import DuplicateCustomId, Request, chat_request, store_requests
from schemas.messages import send_all
from schemas.openai import CHAT_URL, TASK_URL_PREFIX, InvalidRequest, parse_document_line
from schemas.sql.models import ApiBatch, utcnow
from schemas.tasks import CHAT_TASK

log = logging.getLogger(__name__)
INTAKE_LEASE_S = 600
MAX_LISTED_ERRORS = 100


class FileRefused(ValueError):
    """The whole input file is refused: the batch fails with these errors (OpenAI's `errors.data`)."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["message"])
        self.errors = errors


def error(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def task_name(endpoint: str) -> str:
    """The docbatch task an endpoint runs: `chat` for `/v1/chat/completions`, else the name after the prefix."""
    return CHAT_TASK if endpoint == CHAT_URL else endpoint.removeprefix(TASK_URL_PREFIX)


def take_in(ctx: ApiContext, batch_id: str) -> None:
    """`run_intake` in a thread of its own: an error is logged (its type and stack, never a request's content) and
    the lease given back, so that the next sweep tries again."""
    try:
        run_intake(ctx, batch_id)
    except Exception as e:  # noqa: BLE001: a thread's last resort; the batch stays validating for the sweep
        log.error("intake of batch %s failed: %s\n%s", batch_id, type(e).__name__, "".join(traceback.format_tb(
            e.__traceback__)))
        with contextlib.suppress(Exception):
            ctx.store.move_api_batch(batch_id, ["validating"], owner=ctx.owner, lease_owner=None, lease_until=None)


def run_intake(ctx: ApiContext, batch_id: str) -> None:
    """Take the batch in if it is `validating` and nobody else is at it (safe to call at any time, any number of
    times, from any process)."""
    row = ctx.store.lease_api_batch(batch_id, ["validating"], ctx.owner, INTAKE_LEASE_S)
    if row is None:
        return
    to_send: dict[str, str | None] = {}
    if ctx.store.get_batch(batch_id) is None:
        try:
            to_send = _make_batch(ctx, row)
        except FileRefused as e:
            ctx.store.move_api_batch(batch_id, ["validating"], owner=ctx.owner, status="failed", failed_at=utcnow(),
                                     errors=e.errors[:MAX_LISTED_ERRORS], lease_owner=None, lease_until=None)
            log.info("batch %s failed validation: %s", batch_id, e.errors[0]["code"])
            return
    if not ctx.store.move_api_batch(batch_id, ["validating"], owner=ctx.owner, status="in_progress",
                                    in_progress_at=utcnow(), lease_owner=None, lease_until=None):
        # cancelled while it was taken in: its jobs must not run
        ctx.store.cancel_batch(batch_id)
        ctx.store.move_api_batch(batch_id, ["cancelling"], owner=ctx.owner, lease_owner=None, lease_until=None)
        return
    log.info("batch %s in progress: %d jobs to send", batch_id, len(to_send))
    # Redis away: what was not sent is queued in SQL, and the workers' sweep sends it
    send_all(ctx.celery, ctx.store, [(job_id, 5, name) for job_id, name in to_send.items()],
             ctx.settings.message_grace_s)


def _make_batch(ctx: ApiContext, row: ApiBatch) -> dict[str, str | None]:
    """Parse and store the requests, make the docbatch batch; returns the jobs to send (id -> name)."""
    task = ctx.tasks[task_name(row.endpoint)]
    parse = chat_request if task.kind == "chat" else _document_parser(ctx, row)
    lines = _lines(ctx, row)
    source = ctx.store.get_api_file(row.key_id, row.input_file_id)
    if source is None or source.expired_at is not None:
        raise FileRefused([error("missing_file", f"the input file {row.input_file_id} was deleted or expired")])
    try:
        items, rejects, _ = store_requests(ctx.store, lines, parse)
    except FileRefused:
        raise
    except DuplicateCustomId as e:
        raise FileRefused([error("duplicate_custom_id", str(e), e.line)]) from e
    except UnicodeDecodeError as e:
        raise FileRefused([error("invalid_file_format", f"the file is not UTF-8 JSON lines: {e.reason}")]) from e
    except ValueError as e:
        raise FileRefused([error("empty_file", str(e))]) from e
    if not items:
        raise FileRefused([error(reject.code.value, reject.message, reject.line) for reject in rejects])
    key = ctx.store.get_api_key(row.key_id)
    ctx.store.put_task(task.hash, task.name, task.model_dump(mode="json"))
    made = ctx.store.create_batch(task.name, {"task": task.hash, "key": row.key_id}, ctx.settings.model, items,
                                  label=f"api:{key.name if key else row.key_id}", priority=5, rejects=rejects,
                                  task_hash=task.hash, key_by_name=task.uses_filename, batch_id=row.id)
    return {job_id: made.names.get(job_id) for job_id in made.to_enqueue}


def _lines(ctx: ApiContext, row: ApiBatch) -> Iterator[str]:
    """The input file's lines, decoded as UTF-8 part by part (UnicodeDecodeError for another encoding); more than
    `api_max_requests` lines refuse the file."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, count = "", 0
    for part in ctx.store.api_file_parts(row.input_file_id):
        pending += decoder.decode(part)
        *complete, pending = pending.split("\n")
        for line in complete:
            count += 1
            if count > ctx.settings.api_max_requests:
                raise FileRefused([error("too_many_requests", f"the file holds more than "
                                         f"{ctx.settings.api_max_requests} lines (api_max_requests)", count)])
            yield line
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


def _document_parser(ctx: ApiContext, row: ApiBatch):
    """A docbatch task line's document: a `user_data` file of the batch's key, as a stored document."""
    shas: dict[str, str | None] = {}

    def parse(line: str) -> Request:
        custom_id, file_id = parse_document_line(line, row.endpoint)
        if file_id not in shas:
            found = ctx.store.get_api_file(row.key_id, file_id)
            shas[file_id] = found.document_sha256 if found and found.expired_at is None else None
        if shas[file_id] is None:
            raise InvalidRequest(f"no user_data file {file_id}", custom_id)
        return Request(custom_id, shas[file_id])

    return parse
