"""A claimed job as the model's request: the prompt (a document, a chunk of one, the chunks' answers to
combine, or an OpenAI chat request), the decoding settings and the answer's JSON schema."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from schemas.sql.models import Job
from schemas.openai import ChatRequest
from schemas.states import DocbatchError, ErrorCode
from schemas.sql.store import StoredPage
from schemas.tasks import Generation, TaskDefinition, schema_text
from worker.engine.request import ModelInput
from worker.documents.inputs import Part, document_parts, materialise
from worker.documents.ocr import ocr_warnings
from worker.answers.prompts import Prompt, build_text_prompt, chat_tokens
from worker.service.runtime import Runtime


@dataclass(frozen=True)
class Request:
    """A claimed job as the model gets it: its prompt, decoding settings and answer schema (text), and the warnings
    its result will carry about the document's pages (OCR unsure of some), read with the pages for the prompt."""

    task: TaskDefinition
    prompt: Prompt
    generation: Generation
    schema: str | None
    page_warnings: tuple[dict[str, str], ...] = ()


def build_request(rt: Runtime, job: Job) -> Request:
    task = rt.task(job.params.get("task"))
    if task.kind == "chat":
        request = ChatRequest.model_validate_json(rt.store.read_document(job.document_sha256)[0])
        return Request(task, *_chat_prompt(rt, request, task.generation))
    # a whole document's pages, read once a job: its prompt's text or images (unless it combines its chunks'
    # answers) and its result's OCR warnings
    pages = rt.store.load_pages(job.document_sha256) if job.parent_id is None else None
    warnings = tuple(ocr_warnings(pages, rt.settings.ocr_min_confidence)) if pages else ()
    return Request(task, _document_prompt(rt, job, task, pages), task.generation, task.schema_text, warnings)


def _document_prompt(rt: Runtime, job: Job, task: TaskDefinition, pages: list[StoredPage] | None) -> Prompt:
    """A document (or part) under the task's prompt; the parts' answers under its reduce prompt. `pages`: a whole
    document's."""
    if job.input_parts is not None and (job.parent_id is None or job.chunk_level > 1):
        return _build_prompt(rt, task, job.input_parts, reduce=True, metadata={})
    metadata = {"filename": job.params.get("filename")}
    if task.uses_stored_metadata:
        metadata.update(rt.store.document_meta(job.document_sha256))
    if job.parent_id is None:
        if pages is None:
            raise RuntimeError("job is ready but its document has no extracted pages")
        parts = document_parts(pages, rt.info.is_vision, rt.store)
    else:
        parts = [{"text": f"[part {job.chunk_index + 1} of a longer document]"}, *job.input_parts]
    return _build_prompt(rt, task, parts, reduce=False, metadata=metadata)


def _chat_prompt(rt: Runtime, request: ChatRequest, defaults: Generation) -> tuple[Prompt, Generation, str | None]:
    """An OpenAI chat request as the model's prompt, its decoding settings and its answer's schema (text)."""
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


def _build_prompt(rt: Runtime, task: TaskDefinition, parts: list[Part], *, reduce: bool,
                  metadata: dict[str, Any]) -> Prompt:
    try:
        if rt.processor is not None:
            from worker.models.vision import build_vision_prompt

            return build_vision_prompt(rt.processor, task.around_text(reduce=reduce, **metadata),
                                       materialise(parts, rt.store), rt.max_input_tokens,
                                       tensors=not getattr(rt.engine, "processes_images", False))
        render: Callable[[str], str] = task.render_reduce if reduce else partial(task.render, **metadata)
        return build_text_prompt(rt.tokenizer, render, "\n\n".join(p["text"] for p in parts), rt.max_input_tokens)
    except ValueError as e:  # the fixed part of the prompt (template, images) alone exceeds the budget
        raise DocbatchError(ErrorCode.INPUT_TOO_LONG, str(e)) from e
