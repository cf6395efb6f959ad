"""The two Celery tasks. Each claims its job with a compare-and-set in SQL, so duplicates do nothing.

prepare (CPU pool):  queued -> preparing -> ready: pages extracted (OCR for text-only models), stored;
                     a document too long for one request becomes chunk jobs (map) and its job waits.
                     An OpenAI chat request has nothing to extract and goes straight on.
infer (GPU thread):  ready -> running -> done, via the in-process engine that batches across threads;
                     the answer is decoded under the task's JSON schema, validated and checked;
                     the last chunk of a level to finish moves its document on (reduce: the chunks'
                     answers merged by the schema's rules, the model asked only about conflicts).
A failure of one document becomes that job's failed state with a reason code; the worker goes on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, TypeVar

from celery import current_app, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel

from schemas.lifecycle import is_infrastructure_error
from schemas.messages import INFER_TASK, PREPARE_TASK, send
from schemas.models import Job
from schemas.openai import ChatRequest
from schemas.states import DocbatchError, ErrorCode, JobState
from schemas.store import StoredPage
from schemas.tasks import Generation, TaskDefinition, schema_text
from worker import failpoints, runtime
from worker.checks import check_answer
from worker.engine import Completion, GenerationOptions, ModelInput, RequestTooLarge
from worker.extract import ExtractedPage, extract_pages
from worker.inputs import (
    Part,
    document_parts,
    materialise,
    plan_job_chunks,
    reduce_parts,
)
from worker.merge import conflict_prompt_text, merge_answers
from worker.ocr import ocr_image
from worker.prompts import (
    Prompt,
    build_text_prompt,
    chat_tokens,
    prompt_reserve,
    validate_json,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


def _fail_on_error(job: Job, work: Callable[[], T]) -> T | None:
    """Run `work` for a job this process holds and return its value; turn its failure into the job's
    failed state (and its document's, for a chunk) and return None. A database away for longer than
    `db_retry_s` is not the job's fault: the job is let go as it is, and comes back when its lease expires."""
    rt = runtime.current()
    raw_text = None
    try:
        return work()
    except DocbatchError as e:
        log.info("job %s failed: %s", job.id, e)
        code, message, raw_text = e.code, e.message, e.raw_text
    except SoftTimeLimitExceeded:
        code, message = ErrorCode.EXTRACT_TIMEOUT, "extraction ran past prepare_timeout_s"
    except MemoryError:
        code, message = ErrorCode.EXTRACT_MEMORY, "extraction ran out of its memory limit (prepare_memory_mb)"
    except Exception as e:  # noqa: BLE001 - a bug in one job must not stop the worker
        if is_infrastructure_error(e):
            log.error("job %s: the database was away for longer than db_retry_s (%s); letting the job go",
                      job.id, e)
            return None
        log.exception("job %s failed unexpectedly", job.id)
        code, message = ErrorCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}"
    rt.store.fail(job.id, code, message, raw_text, holder=rt.holder)
    if job.parent_id:
        rt.store.fail(job.parent_id, ErrorCode.CHUNK_FAILED, f"chunk {job.chunk_index + 1} (level {job.chunk_level}) "
                                                             f"failed: {code.value}: {message}", holder=None)
    return None


def send_infer(job_id: str, priority: int, name: str | None = None) -> None:
    send(current_app, INFER_TASK, job_id, priority, name)


def _document(job: Job) -> Callable[[], bytes]:
    return lambda: runtime.current().store.read_document(job.document_sha256)[0]


@shared_task(name=PREPARE_TASK)
def prepare(job_id: str, name: str | None = None) -> None:
    """`name` is the document's name in its batch, carried for Flower and the logs only."""
    rt = runtime.current()
    job = rt.store.claim(job_id, JobState.QUEUED, JobState.PREPARING, rt.holder)
    if job is None:
        log.info("job %s is not queued any more; nothing to do", job_id)
        return
    rt.held.add(job_id)
    try:
        failpoints.hit("prepare_claimed", rt.settings, _document(job))
        _fail_on_error(job, lambda: _prepare(job, name))
    finally:
        rt.held.discard(job_id)


def _prepare(job: Job, name: str | None) -> None:
    rt = runtime.current()
    task = rt.task(job.params.get("task"))
    if task.kind == "chat":  # an OpenAI request: nothing to extract
        chunks = None
    else:
        pages = ensure_pages(job.document_sha256)
        parts = document_parts(pages, rt.info.is_vision, rt.store)
        chunks = plan_job_chunks(parts, rt.info, _chunk_budget(task), rt.settings.chunk_overlap_tokens)
    if chunks is None:
        if rt.store.mark_ready(job.id, rt.holder):
            send_infer(job.id, job.priority, name)
    else:
        log.info("job %s: %d parts in %d chunks", job.id, len(parts), len(chunks))
        start_chunks(job, 1, chunks, from_held=True)


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


def start_chunks(parent: Job, level: int, chunks: list[list[Part]], from_held: bool = False) -> None:
    """Make a level of chunk jobs under `parent` (which this process holds, `from_held`, or which waits on its
    previous level) and send the ones not yet done to inference."""
    rt = runtime.current()
    pending, all_done = rt.store.create_chunks(parent.id, level, chunks, rt.holder if from_held else None)
    for chunk_id in pending:
        send_infer(chunk_id, parent.priority)
    if all_done:
        advance_parent(parent.id, level)


def _chunk_budget(task: TaskDefinition) -> int:
    rt = runtime.current()
    return rt.max_input_tokens - prompt_reserve(task, rt.info.count_tokens)


def advance_parent(parent_id: str, level: int) -> None:
    """Every chunk of `level` is done: merge their answers by the task's schema; when they agree, that is
    the document's answer. Otherwise the model resolves the conflicts (or, without a schema, combines the
    answers) in the parent, or in another level when that input is still too long."""
    rt = runtime.current()
    parent = rt.store.get_job(parent_id)
    task = rt.task(parent.params.get("task"))
    outputs = rt.store.chunk_outputs(parent_id, level)
    if task.schema_text is not None and all("json" in output for output in outputs):
        merged = merge_answers(task.json_schema, [output["json"] for output in outputs])
        if not merged.conflicts and _finish_merged(parent_id, task, merged.value):
            return
        parts: list[Part] = [{"text": conflict_prompt_text(merged)}]
    else:
        parts = reduce_parts(outputs)
    chunks = plan_job_chunks(parts, rt.info, _chunk_budget(task), 0)
    if chunks is None:
        if rt.store.set_reduce_input(parent_id, parts):
            send_infer(parent_id, parent.priority)
    else:
        start_chunks(parent, level + 1, chunks)


def _finish_merged(parent_id: str, task: TaskDefinition, value: dict[str, Any]) -> bool:
    """Record the merged answer as the document's; False when it does not validate (the model reduces then)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        answer = validate_json(task.schema_text, text, task.output_model)
    except DocbatchError as e:
        log.warning("job %s: the merged answer is invalid (%s); the model combines the parts", parent_id, e.message)
        return False
    result = {"json": answer, "reduced_by": "merge", **_checked(task, answer)}
    runtime.current().store.finish(parent_id, result, text, tokens_in=None, tokens_out=None, batch_size=None,
                                   holder=None)
    return True


@shared_task(name=INFER_TASK)
def infer(job_id: str, name: str | None = None) -> None:
    """`name` is the document's name in its batch, carried for Flower and the logs only."""
    rt = runtime.current()
    seen = rt.store.get_job(job_id)
    if seen is None or seen.state != JobState.READY:
        log.info("job %s is not ready any more; nothing to do", job_id)
        return
    try:
        with rt.lane.start(alone=seen.isolate):  # claim and prompt: where a hostile document kills its worker
            job = rt.store.claim(job_id, JobState.READY, JobState.RUNNING, rt.holder, count_attempt=True)
            if job is None:
                log.info("job %s was taken by another worker; nothing to do", job_id)
                return
            rt.held.add(job_id)
            failpoints.hit("infer_claimed", rt.settings, _document(job))
            request = _fail_on_error(job, lambda: _request(job))
        if request is not None:
            if job.isolate:
                rt.store.pass_isolation(job_id, rt.holder)
            _fail_on_error(job, lambda: _answer_and_finish(job, request))
    finally:
        rt.held.discard(job_id)


@dataclass(frozen=True)
class Request:
    """A claimed job as the model gets it: its prompt, decoding settings and answer schema (text)."""

    task: TaskDefinition
    prompt: Prompt
    generation: Generation
    schema: str | None


def _request(job: Job) -> Request:
    rt = runtime.current()
    task = rt.task(job.params.get("task"))
    if task.kind == "chat":
        request = ChatRequest.model_validate_json(rt.store.read_document(job.document_sha256)[0])
        return Request(task, *_chat_prompt(request, task.generation))
    return Request(task, _document_prompt(job, task), task.generation, task.schema_text)


def _answer_and_finish(job: Job, request: Request) -> None:
    rt = runtime.current()
    task, prompt = request.task, request.prompt
    answer = _answer(prompt.model_input, request.generation, request.schema, task.output_model,
                     repair=task.kind != "chat")
    result: dict[str, Any] = {"text": answer.text} if answer.value is None or task.kind == "chat" else {}
    if answer.value is not None:
        result["json"] = answer.value
        if job.parent_id is None:
            result.update(_checked(task, answer.value))
    result.update(input_truncated=prompt.is_truncated, finish_reason=answer.finish_reason)
    finished = rt.store.finish(job.id, result, answer.text, tokens_in=len(prompt.model_input.token_ids),
                               tokens_out=len(answer.completion.token_ids), batch_size=answer.completion.batch_size,
                               holder=rt.holder)
    if not finished:
        log.warning("job %s was taken back before its answer was stored (its lease expired); answer dropped", job.id)
    elif job.parent_id and rt.store.chunk_finished(job.parent_id):
        advance_parent(job.parent_id, job.chunk_level)


def _checked(task: TaskDefinition, answer: Any) -> dict[str, Any]:
    """The task's consistency checks on a document's final answer, as the result's `warnings`."""
    if task.checks is None:
        return {}
    return {"warnings": [warning.as_dict() for warning in check_answer(task.checks, answer)]}


def _document_prompt(job: Job, task: TaskDefinition) -> Prompt:
    """A document (or part) under the task's prompt; the parts' answers under its reduce prompt."""
    rt = runtime.current()
    if job.input_parts is not None and (job.parent_id is None or job.chunk_level > 1):
        return _build_prompt(task, job.input_parts, reduce=True, metadata={})
    metadata = {"filename": job.params.get("filename")}
    if task.uses_stored_metadata:
        metadata.update(rt.store.document_meta(job.document_sha256))
    if job.parent_id is None:
        parts = document_parts(_pages(job), rt.info.is_vision, rt.store)
    else:
        parts = [{"text": f"[part {job.chunk_index + 1} of a longer document]"}, *job.input_parts]
    return _build_prompt(task, parts, reduce=False, metadata=metadata)


def _chat_prompt(request: ChatRequest, defaults: Generation) -> tuple[Prompt, Generation, str | None]:
    """An OpenAI chat request as the model's prompt, its decoding settings and its answer's schema (text)."""
    rt = runtime.current()
    token_ids = chat_tokens(rt.tokenizer, request.chat_messages())
    room = min(rt.max_input_tokens, rt.info.context_tokens - 1) - len(token_ids)
    if room < 0:
        raise DocbatchError(ErrorCode.INPUT_TOO_LONG, f"the messages take {len(token_ids)} tokens, over the input "
                                                      f"budget of {rt.max_input_tokens}")
    requested = request.max_completion_tokens or request.max_tokens or defaults.max_new_tokens
    generation = defaults.model_copy(update={
        "max_new_tokens": max(1, min(requested, rt.info.context_tokens - len(token_ids))),
        "temperature": defaults.temperature if request.temperature is None else request.temperature,
        "top_p": defaults.top_p if request.top_p is None else request.top_p})
    schema = request.answer_schema()
    return Prompt(ModelInput(token_ids), is_truncated=False), generation, schema_text(schema) if schema else None


@dataclass(frozen=True)
class Answer:
    value: Any  # the validated JSON, or None for a free-text answer
    text: str
    completion: Completion
    finish_reason: str  # "stop" (end of answer) or "length" (max_new_tokens reached), as OpenAI says


def _answer(model_input: ModelInput, generation: Generation, schema: str | None,
            output_model: type[BaseModel] | None, *, repair: bool) -> Answer:
    """The answer to one prompt, decoded under the JSON `schema` (its text) and validated when there is
    one (and by the
    built-in task's pydantic `output_model`).

    An invalid answer under constraints was cut off by max_new_tokens. With `repair` it gets twice the
    room, once; then the job fails with `schema_invalid`, the answer kept. Without (an OpenAI request,
    whose max_tokens is the caller's limit) the cut answer is returned as OpenAI does: finish_reason
    `length`, the text as far as it got."""
    options = GenerationOptions(repetition_penalty=generation.repetition_penalty, temperature=generation.temperature,
                                top_p=generation.top_p, ignore_eos=generation.ignore_eos)
    limit = generation.max_new_tokens
    if schema is None or generation.ignore_eos:  # ignore_eos: benchmarks, free text of exactly max_new_tokens
        text, completion = _generate(model_input, limit, options)
        return Answer(None, text, completion, _finish_reason(completion, limit))
    model_input = dataclasses.replace(model_input, json_schema=schema)
    for room in (limit, 2 * limit) if repair else (limit,):
        text, completion = _generate(model_input, room, options)
        reason = _finish_reason(completion, room)
        try:
            return Answer(validate_json(schema, text, output_model), text, completion, reason)
        except DocbatchError as e:
            error = DocbatchError(e.code, e.message, raw_text=text)
            log.info("answer invalid after %d tokens (%s): %s", len(completion.token_ids), reason, e.message)
    if not repair and reason == "length":
        return Answer(None, text, completion, reason)
    raise error


def _finish_reason(completion: Completion, limit: int) -> str:
    return "length" if len(completion.token_ids) >= limit else "stop"


def _generate(model_input: ModelInput, max_new_tokens: int, options: GenerationOptions) -> tuple[str, Completion]:
    """Hand one prompt to the batching engine and wait for its answer."""
    rt = runtime.current()
    try:
        completion = rt.engine.submit(model_input, max_new_tokens, options).result()
    except RequestTooLarge as e:
        raise DocbatchError(ErrorCode.OUT_OF_MEMORY, str(e)) from e
    return rt.tokenizer.decode(completion.token_ids, skip_special_tokens=True), completion


def _pages(job: Job) -> list[StoredPage]:
    pages = runtime.current().store.load_pages(job.document_sha256)
    if pages is None:
        raise RuntimeError("job is ready but its document has no extracted pages")
    return pages


def _build_prompt(task: TaskDefinition, parts: list[Part], *, reduce: bool, metadata: dict[str, Any]) -> Prompt:
    rt = runtime.current()
    try:
        if rt.processor is not None:
            from worker.vision import build_vision_prompt

            return build_vision_prompt(rt.processor, task.around_text(reduce=reduce, **metadata),
                                       materialise(parts, rt.store), rt.max_input_tokens)
        render: Callable[[str], str] = task.render_reduce if reduce else partial(task.render, **metadata)
        return build_text_prompt(rt.tokenizer, render, "\n\n".join(p["text"] for p in parts), rt.max_input_tokens)
    except ValueError as e:  # the fixed part of the prompt (template, images) alone exceeds the budget
        raise DocbatchError(ErrorCode.INPUT_TOO_LONG, str(e)) from e
