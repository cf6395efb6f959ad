"""Task prompts, and turning a job's input into chat-templated prompt tokens within the budget."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas.outputs import ContractSummary, FinancialReport
from schemas.settings import Settings
from schemas.states import DocbatchError, ErrorCode
from worker.engine import ModelInput

# Template tokens and the longest instruction fit well within this; chunks are planned below it.
PROMPT_RESERVE_TOKENS = 256


@dataclass(frozen=True)
class TaskSpec:
    name: str
    instruction: str  # placed after the document: small models follow it far better there
    reduce_instruction: str  # combines the answers for the parts of a long document
    output: type[BaseModel]  # the answer is JSON of this model, enforced while decoding

    @cached_property
    def json_schema(self) -> str:
        return json.dumps(self.output.model_json_schema(), sort_keys=True)


TASKS: dict[str, TaskSpec] = {
    "summarize": TaskSpec(
        "summarize",
        "Summarize this contract as JSON: a summary of a few sentences, the parties and their roles, the "
        "agreement, effective and expiration dates, term, renewal, payment terms, termination, governing "
        "law, liability cap and key obligations. Use null for anything the contract does not state.",
        "These are JSON summaries of consecutive parts of one contract. Combine them into one JSON summary "
        "of the whole contract, keeping every stated fact; use null for anything no part states.",
        ContractSummary),
    "extract": TaskSpec(
        "extract",
        "Extract this financial report as JSON: company, report type, period, currency (ISO code), unit "
        "scale, revenue, cost of revenue, operating income, net income, EPS basic and diluted, total assets, "
        "total liabilities, equity, cash, operating cash flow, capital expenditure and segment revenues. "
        "Numbers as numbers in the stated unit; null for anything the report does not state.",
        "These are JSON extractions from consecutive parts of one financial report. Combine them into one "
        "JSON extraction; where parts disagree, prefer the figure stated as a total.",
        FinancialReport),
}


def task_params(settings: Settings) -> dict[str, Any]:
    """The parameters that, with document, task and model, identify a job (its idempotency key)."""
    params: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens,
                              "repetition_penalty": settings.repetition_penalty, "prompt_version": 4}
    if settings.ignore_eos:
        params["ignore_eos"] = True
    return params


def instruction_for(task: TaskSpec, is_chunk: bool, chunk_level: int | None, chunk_index: int | None,
                    has_parts: bool) -> str:
    """What to ask of a job: the task over a whole document or over a part of one (a level-1 chunk),
    or the reduce step (a chunk of a higher level, or a document job given its chunks' answers)."""
    if is_chunk and chunk_level == 1:
        return f"This is part {chunk_index + 1} of a longer document. {task.instruction}"
    if is_chunk or has_parts:
        return task.reduce_instruction
    return task.instruction


@dataclass(frozen=True)
class Prompt:
    model_input: ModelInput
    is_truncated: bool


def build_text_prompt(tokenizer: Any, instruction: str, text: str, max_input_tokens: int) -> Prompt:
    """Chat-template the instruction after the text, cutting the text if the prompt would not fit.

    Long documents are chunked before they get here, so a cut is a last resort (`is_truncated`)."""
    def encode(document: str) -> list[int]:
        messages = [{"role": "user", "content": f"{document}\n\n{instruction}"}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
        return list(encoded["input_ids"])

    overhead = len(encode(""))
    doc_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = max_input_tokens - overhead
    if room <= 0:
        raise ValueError(f"input budget {max_input_tokens} is smaller than the prompt itself ({overhead})")
    if len(doc_ids) <= room:
        return Prompt(ModelInput(encode(text)), is_truncated=False)
    return Prompt(ModelInput(encode(tokenizer.decode(doc_ids[:room]))), is_truncated=True)


def constrained(model_input: ModelInput, task: TaskSpec) -> ModelInput:
    """The same prompt, with its answer held to the task's JSON schema."""
    return dataclasses.replace(model_input, json_schema=task.json_schema)


def parse_output(task: TaskSpec, text: str, is_truncated: bool) -> dict[str, Any]:
    """The result stored for a job: the answer validated against the task's model.

    Raises `DocbatchError(schema_invalid)`; constrained decoding makes that rare (an answer cut off by
    `max_new_tokens`)."""
    try:
        answer = task.output.model_validate_json(text)
    except ValidationError as e:
        raise DocbatchError(ErrorCode.SCHEMA_INVALID, f"the answer is not a valid {task.output.__name__}: "
                                                      f"{e.errors()[0]['msg']} ({e.error_count()} errors)") from e
    return {"json": answer.model_dump(mode="json"), "input_truncated": is_truncated}
