"""Task prompts, and turning a job's input into chat-templated prompt tokens within the budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.settings import Settings
from worker.engine import ModelInput

# Template tokens and the longest instruction fit well within this; chunks are planned below it.
PROMPT_RESERVE_TOKENS = 256


@dataclass(frozen=True)
class TaskSpec:
    name: str
    instruction: str  # placed after the document: small models follow it far better there
    reduce_instruction: str  # combines the answers for the parts of a long document


TASKS: dict[str, TaskSpec] = {
    "summarize": TaskSpec(
        "summarize",
        "Summarize this contract in a few sentences: who the parties are and their roles, what they agree, "
        "the dates and term, payment, renewal and termination terms, governing law and any cap on liability.",
        "These are summaries of consecutive parts of one contract. Combine them into one summary of the "
        "whole contract in a few sentences: the parties and their roles, what they agree, the dates and "
        "term, payment, renewal and termination terms, governing law and any cap on liability."),
    "extract": TaskSpec(
        "extract",
        "List the company name, the reporting period, the currency and unit, revenue, net income, total "
        "assets, total liabilities and equity stated in this financial report.",
        "These are the figures found in consecutive parts of one financial report. Combine them into one "
        "list of the company name, the reporting period, the currency and unit, revenue, net income, total "
        "assets, total liabilities and equity; where parts disagree, prefer the figure stated as a total."),
}


def task_params(settings: Settings) -> dict[str, Any]:
    """The parameters that, with document, task and model, identify a job (its idempotency key)."""
    params: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens,
                              "repetition_penalty": settings.repetition_penalty, "prompt_version": 3}
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


def parse_output(text: str, is_truncated: bool) -> dict[str, Any]:
    """The result stored for a job."""
    return {"text": text.strip(), "input_truncated": is_truncated}
