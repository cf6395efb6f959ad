"""Long documents: a level of chunk jobs under the document's job, and what happens when the last chunk
of a level is done: the chunks' answers merged by the task's schema (the document's answer when they
agree), else the model asked about the conflicts only (or, without a schema, to combine the answers)."""
from __future__ import annotations

import json
import logging
from typing import Any

from schemas.messages import INFER_TASK, send
from schemas.sql.models import Job
from schemas.states import DocbatchError
from schemas.tasks import TaskDefinition
from worker.answers.checks import result_warnings
from worker.documents.inputs import Part, plan_job_chunks, reduce_parts
from worker.documents.ocr import ocr_warnings
from worker.answers.merge import conflict_prompt_text, merge_answers
from worker.answers.prompts import prompt_reserve, validate_json
from worker.service.runtime import Runtime

log = logging.getLogger(__name__)


def send_infer(rt: Runtime, job_id: str, priority: int, name: str | None = None) -> None:
    send(rt.app, INFER_TASK, job_id, priority, name)


def chunk_budget(rt: Runtime, task: TaskDefinition) -> int:
    """Tokens of a document one request can take under `task`'s prompt."""
    return rt.max_input_tokens - prompt_reserve(task, rt.info.count_tokens)


def start_chunks(rt: Runtime, parent: Job, level: int, chunks: list[list[Part]], from_held: bool = False) -> None:
    """Make a level of chunk jobs under `parent` (which this process holds, `from_held`, or which waits on its
    previous level) and send the ones not yet done to inference."""
    pending, all_done = rt.store.create_chunks(parent.id, level, chunks, rt.holder if from_held else None)
    for chunk_id in pending:
        send_infer(rt, chunk_id, parent.priority)
    if all_done:
        advance_parent(rt, parent.id, level)


def advance_parent(rt: Runtime, parent_id: str, level: int) -> None:
    """Every chunk of `level` is done: merge their answers by the task's schema; when they agree, that is
    the document's answer. Otherwise the model resolves the conflicts (or, without a schema, combines the
    answers) in the parent, or in another level when that input is still too long."""
    parent = rt.store.get_job(parent_id)
    task = rt.task(parent.params.get("task"))
    outputs = rt.store.chunk_outputs(parent_id, level)
    if task.schema_text is not None and all("json" in output for output in outputs):
        merged = merge_answers(task.json_schema, [output["json"] for output in outputs])
        if not merged.conflicts and _finish_merged(rt, parent_id, task, merged.value):
            return
        parts: list[Part] = [{"text": conflict_prompt_text(merged)}]
    else:
        parts = reduce_parts(outputs)
    chunks = plan_job_chunks(parts, rt.info, chunk_budget(rt, task), 0)
    if chunks is None:
        if rt.store.set_reduce_input(parent_id, parts):
            send_infer(rt, parent_id, parent.priority)
    else:
        start_chunks(rt, parent, level + 1, chunks)


def _finish_merged(rt: Runtime, parent_id: str, task: TaskDefinition, value: dict[str, Any]) -> bool:
    """Record the merged answer as the document's; False when it does not validate (the model reduces then)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        answer = validate_json(task.schema_text, text, task.output_model)
    except DocbatchError as e:
        log.warning("%s: the merged answer is invalid (%s); the model combines the parts",
                    rt.store.describe_job(parent_id), e.message)
        return False
    result = {"json": answer, "reduced_by": "merge", **result_warnings(task.checks, answer)}
    parent = rt.store.get_job(parent_id)
    unsure = ocr_warnings(rt.store.load_pages(parent.document_sha256) or [], rt.settings.ocr_min_confidence)
    if unsure:
        result["warnings"] = [*result.get("warnings", []), *unsure]
    rt.store.finish(parent_id, result, text, tokens_in=None, tokens_out=None, batch_size=None, holder=None)
    return True
