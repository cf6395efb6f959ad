"""The two Celery tasks. Each claims its job with a compare-and-set in SQL, so duplicates do nothing.

prepare (CPU pool):  queued -> preparing -> ready: pages extracted (OCR for text-only models), stored;
                     a document too long for one request becomes chunk jobs (map) and its job waits.
infer (GPU thread):  ready -> running -> done, via the in-process engine that batches across threads;
                     the last chunk of a level to finish moves its document on (reduce).
A failure of one document becomes that job's failed state with a reason code; the worker goes on.
"""
from __future__ import annotations

import hashlib
import io
import logging
from typing import Callable

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded

from schemas.models import Job
from schemas.states import DocbatchError, ErrorCode, JobState
from schemas.store import StoredPage
from worker import runtime
from worker.celery_app import INFER_QUEUE, INFER_TASK, PREPARE_QUEUE, PREPARE_TASK, broker_priority
from worker.engine import Completion, GenerationOptions, ModelInput, RequestTooLarge
from worker.extract import ExtractedPage, extract_pages
from worker.inputs import Part, document_parts, materialise, plan_job_chunks, reduce_parts
from worker.ocr import ocr_image
from worker.prompts import (PROMPT_RESERVE_TOKENS, TASKS, Prompt, TaskSpec, build_text_prompt, constrained,
                             instruction_for, parse_output)

log = logging.getLogger(__name__)


def _fail_on_error(job: Job, work: Callable[[], None]) -> None:
    """Run `work`; turn its failure into the job's failed state (and its document's, for a chunk)."""
    store = runtime.current().store
    raw_text = None
    try:
        work()
        return
    except DocbatchError as e:
        log.info("job %s failed: %s", job.id, e)
        code, message, raw_text = e.code, e.message, e.raw_text
    except SoftTimeLimitExceeded:
        code, message = ErrorCode.EXTRACT_TIMEOUT, "extraction ran past prepare_timeout_s"
    except MemoryError:
        code, message = ErrorCode.EXTRACT_MEMORY, "extraction ran out of its memory limit (prepare_memory_mb)"
    except Exception as e:  # noqa: BLE001 - a bug in one job must not stop the worker
        log.exception("job %s failed unexpectedly", job.id)
        code, message = ErrorCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}"
    store.fail(job.id, code, message, raw_text)
    if job.parent_id:
        store.fail(job.parent_id, ErrorCode.CHUNK_FAILED, f"chunk {job.chunk_index + 1} (level {job.chunk_level}) "
                                                          f"failed: {code.value}: {message}")


def send_infer(job_id: str, priority: int) -> None:
    infer.apply_async(args=[job_id], queue=INFER_QUEUE, priority=broker_priority(priority))


def send_prepare(job_id: str, priority: int) -> None:
    prepare.apply_async(args=[job_id], queue=PREPARE_QUEUE, priority=broker_priority(priority))


@shared_task(name=PREPARE_TASK)
def prepare(job_id: str) -> None:
    rt = runtime.current()
    job = rt.store.claim(job_id, JobState.QUEUED, JobState.PREPARING, rt.worker_name, rt.settings.job_timeout_s)
    if job is None:
        log.info("job %s is not queued any more; nothing to do", job_id)
        return

    def work() -> None:
        pages = ensure_pages(job.document_sha256)
        parts = document_parts(pages, rt.info.is_vision, rt.store)
        chunks = plan_job_chunks(parts, rt.info, rt.max_input_tokens - PROMPT_RESERVE_TOKENS,
                                 rt.settings.chunk_overlap_tokens)
        if chunks is None:
            rt.store.mark_ready(job_id)
            send_infer(job_id, job.priority)
        else:
            log.info("job %s: %d parts in %d chunks", job_id, len(parts), len(chunks))
            start_chunks(job, 1, chunks)

    _fail_on_error(job, work)


def ensure_pages(sha256: str) -> list[StoredPage]:
    """The document's pages, extracted once and stored; scans OCR'd when the model reads no images."""
    rt = runtime.current()
    pages = rt.store.load_pages(sha256)
    if pages is None:
        data, _ = rt.store.read_document(sha256)
        pages = [_stored(page) for page in extract_pages(data, rt.limits)]
    elif not rt.info.is_vision and any(p.source == "image" for p in pages):
        # Extracted earlier for a vision model: the text-only model needs the scans' text now.
        pages = [StoredPage(_ocr(_load_image(p.image_sha256)), "ocr", p.image_sha256) if p.source == "image" else p
                 for p in pages]
    else:
        return pages
    if not any(p.text.strip() or p.source == "image" for p in pages):
        raise DocbatchError(ErrorCode.NO_TEXT, "no text on any page (OCR found none either)")
    rt.store.save_pages(sha256, pages)
    return pages


def _stored(page: ExtractedPage) -> StoredPage:
    """A freshly extracted page as stored: its image kept by reference, read by OCR while still in memory
    when the model reads no images."""
    if page.image is None:
        return StoredPage(page.text, page.source)
    image_sha256 = _store_image(page.image)
    if runtime.current().info.is_vision:
        return StoredPage("", "image", image_sha256)
    return StoredPage(_ocr(page.image), "ocr", image_sha256)


def _store_image(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    runtime.current().store.put_document(sha, data, "image/png")
    return sha


def _load_image(image_sha256: str):
    from PIL import Image

    return Image.open(io.BytesIO(runtime.current().store.read_document(image_sha256)[0]))


def _ocr(image) -> str:
    settings = runtime.current().settings
    return ocr_image(image, lang=settings.ocr_lang, timeout_s=settings.prepare_timeout_s)


def start_chunks(parent: Job, level: int, chunks: list[list[Part]]) -> None:
    """Make a level of chunk jobs under `parent` and send the ones not yet done to inference."""
    rt = runtime.current()
    pending, all_done = rt.store.create_chunks(parent.id, level, chunks)
    for chunk_id in pending:
        send_infer(chunk_id, parent.priority)
    if all_done:
        advance_parent(parent.id, level)


def advance_parent(parent_id: str, level: int) -> None:
    """Every chunk of `level` is done: reduce their answers in the parent, or in another level."""
    rt = runtime.current()
    parent = rt.store.get_job(parent_id)
    parts = reduce_parts(rt.store.chunk_outputs(parent_id, level))
    chunks = plan_job_chunks(parts, rt.info, rt.max_input_tokens - PROMPT_RESERVE_TOKENS, 0)
    if chunks is None:
        rt.store.set_reduce_input(parent_id, parts)
        send_infer(parent_id, parent.priority)
    else:
        start_chunks(parent, level + 1, chunks)


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
        parts = job.input_parts or document_parts(_pages(job), rt.info.is_vision, rt.store)
        instruction = instruction_for(TASKS[job.task], job.parent_id is not None, job.chunk_level, job.chunk_index,
                                      job.input_parts is not None)
        prompt = _build_prompt(instruction, parts)
        data, text, completion = _answer(TASKS[job.task], prompt, job.params)
        finished = rt.store.finish(job_id, data, text, tokens_in=len(prompt.model_input.token_ids),
                                   tokens_out=len(completion.token_ids), batch_size=completion.batch_size)
        if finished and job.parent_id and rt.store.chunk_finished(job.parent_id):
            advance_parent(job.parent_id, job.chunk_level)

    _fail_on_error(job, work)


def _answer(task: TaskSpec, prompt: Prompt, params: dict) -> tuple[dict, str, Completion]:
    """The task's validated answer to `prompt`, decoded under its JSON schema: (result, text, completion).

    An invalid answer under constraints was cut off by max_new_tokens, so it gets twice the room, once;
    then the job fails with `schema_invalid`, the answer kept."""
    max_new_tokens = int(params["max_new_tokens"])
    options = GenerationOptions(repetition_penalty=float(params["repetition_penalty"]),
                                ignore_eos=bool(params.get("ignore_eos", False)))
    if options.ignore_eos:  # benchmarks: free text of exactly max_new_tokens, neither constrained nor checked
        text, completion = _generate(prompt.model_input, max_new_tokens, options)
        return {"text": text, "input_truncated": prompt.is_truncated}, text, completion
    model_input = constrained(prompt.model_input, task)
    text, completion = _generate(model_input, max_new_tokens, options)
    try:
        return parse_output(task, text, prompt.is_truncated), text, completion
    except DocbatchError:
        log.info("answer cut off at %d tokens; once more with twice the room", max_new_tokens)
    text, completion = _generate(model_input, 2 * max_new_tokens, options)
    try:
        return parse_output(task, text, prompt.is_truncated), text, completion
    except DocbatchError as e:
        raise DocbatchError(e.code, e.message, raw_text=text) from e


def _generate(model_input: ModelInput, max_new_tokens: int, options: GenerationOptions) -> tuple[str, Completion]:
    """Hand one prompt to the batching engine and wait for its answer."""
    rt = runtime.current()
    try:
        completion = rt.engine.submit(model_input, max_new_tokens, options).result(timeout=rt.settings.job_timeout_s)
    except RequestTooLarge as e:
        raise DocbatchError(ErrorCode.OUT_OF_MEMORY, str(e)) from e
    return rt.tokenizer.decode(completion.token_ids, skip_special_tokens=True), completion


def _pages(job: Job) -> list[StoredPage]:
    pages = runtime.current().store.load_pages(job.document_sha256)
    if pages is None:
        raise RuntimeError("job is ready but its document has no extracted pages")
    return pages


def _build_prompt(instruction: str, parts: list[Part]) -> Prompt:
    rt = runtime.current()
    try:
        if rt.processor is not None:
            from worker.vision import build_vision_prompt

            return build_vision_prompt(rt.processor, instruction, materialise(parts, rt.store), rt.max_input_tokens)
        return build_text_prompt(rt.tokenizer, instruction, "\n\n".join(p["text"] for p in parts),
                                 rt.max_input_tokens)
    except ValueError as e:  # the fixed part of the prompt (template, images) alone exceeds the budget
        raise DocbatchError(ErrorCode.INPUT_TOO_LONG, str(e)) from e
