"""The two Celery tasks. Each claims its job with a compare-and-set in SQL, so duplicates do nothing.

prepare (CPU pool):  queued -> preparing -> ready, page texts stored, then an infer message is sent.
infer (GPU thread):  ready -> running -> done, via the in-process engine that batches across threads.
A failure of one document becomes that job's failed state with a reason code; the worker goes on.
"""
from __future__ import annotations

import logging
from typing import Callable

from celery import shared_task

from schemas.states import DocbatchError, ErrorCode, JobState
from worker import runtime
from worker.celery_app import INFER_QUEUE, INFER_TASK, PREPARE_TASK, broker_priority
from worker.engine import GenerationOptions, RequestTooLarge
from worker.extract import extract_pages
from worker.prompts import TASKS, build_prompt, parse_output

log = logging.getLogger(__name__)


def _fail_on_error(job_id: str, work: Callable[[], None]) -> None:
    """Run `work`; turn its failure into the job's failed state. Expected errors log at info."""
    store = runtime.current().store
    try:
        work()
    except DocbatchError as e:
        log.info("job %s failed: %s", job_id, e)
        store.fail(job_id, e.code, e.message)
    except Exception as e:  # noqa: BLE001 - a bug in one job must not stop the worker
        log.exception("job %s failed unexpectedly", job_id)
        store.fail(job_id, ErrorCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}")


@shared_task(name=PREPARE_TASK)
def prepare(job_id: str) -> None:
    rt = runtime.current()
    job = rt.store.claim(job_id, JobState.QUEUED, JobState.PREPARING, rt.worker_name, rt.settings.job_timeout_s)
    if job is None:
        log.info("job %s is not queued any more; nothing to do", job_id)
        return

    def work() -> None:
        if rt.store.load_pages(job.document_sha256) is None:
            data, media_type = rt.store.read_document(job.document_sha256)
            rt.store.save_pages(job.document_sha256, extract_pages(data, media_type))
        rt.store.mark_ready(job_id)
        infer.apply_async(args=[job_id], queue=INFER_QUEUE, priority=broker_priority(job.priority))

    _fail_on_error(job_id, work)


@shared_task(name=INFER_TASK)
def infer(job_id: str) -> None:
    rt = runtime.current()
    job = rt.store.claim(job_id, JobState.READY, JobState.RUNNING, rt.worker_name, rt.settings.job_timeout_s,
                         count_attempt=True)
    if job is None:
        log.info("job %s is not ready any more; nothing to do", job_id)
        return
    if job.attempts > rt.settings.max_attempts:
        rt.store.fail(job_id, ErrorCode.TOO_MANY_ATTEMPTS, f"gave up after {job.attempts - 1} attempts")
        return

    def work() -> None:
        pages = rt.store.load_pages(job.document_sha256)
        if pages is None:
            raise RuntimeError("job is ready but its document has no extracted pages")
        task = TASKS[job.task]
        prompt = build_prompt(rt.tokenizer, task, "\n\n".join(pages), rt.max_input_tokens)
        options = GenerationOptions(repetition_penalty=float(job.params["repetition_penalty"]),
                                    ignore_eos=bool(job.params.get("ignore_eos", False)))
        try:
            future = rt.engine.submit(prompt.token_ids, int(job.params["max_new_tokens"]), options)
            completion = future.result(timeout=rt.settings.job_timeout_s)
        except RequestTooLarge as e:
            raise DocbatchError(ErrorCode.OUT_OF_MEMORY, str(e)) from e
        text = rt.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        rt.store.finish(job_id, parse_output(text, prompt.is_truncated), text,
                        tokens_in=len(prompt.token_ids), tokens_out=len(completion.token_ids),
                        batch_size=completion.batch_size)

    _fail_on_error(job_id, work)
