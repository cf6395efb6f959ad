"""Task prompts and turning a document into chat-templated prompt tokens within the input budget."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.settings import Settings



@dataclass(frozen=True)
class TaskSpec:
    name: str
    instruction: str  # placed after the document: small models follow it far better there


TASKS: dict[str, TaskSpec] = {
    "summarize": TaskSpec(
        "summarize",
        "Summarize this contract in a few sentences: who the parties are and their roles, what they agree, "
        "the dates and term, payment, renewal and termination terms, governing law and any cap on liability."),
    "extract": TaskSpec(
        "extract",
        "List the company name, the reporting period, the currency and unit, revenue, net income, total "
        "assets, total liabilities and equity stated in this financial report."),
}


def task_params(settings: Settings) -> dict[str, Any]:
    """The parameters that, with document, task and model, identify a job (its idempotency key)."""
    params: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens,
                              "repetition_penalty": settings.repetition_penalty, "prompt_version": 2}
    if settings.ignore_eos:
        params["ignore_eos"] = True
    return params


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    is_truncated: bool


def build_prompt(tokenizer: Any, task: TaskSpec, text: str, max_input_tokens: int) -> Prompt:
    """Chat-template the task over the document, cutting the document so the prompt fits the budget."""
    def encode(document: str) -> list[int]:
        messages = [{"role": "user", "content": f"{document}\n\n{task.instruction}"}]
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
        return list(encoded["input_ids"])

    overhead = len(encode(""))
    doc_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = max_input_tokens - overhead
    if room <= 0:
        raise ValueError(f"input budget {max_input_tokens} is smaller than the prompt itself ({overhead})")
    if len(doc_ids) <= room:
        return Prompt(encode(text), is_truncated=False)
    return Prompt(encode(tokenizer.decode(doc_ids[:room])), is_truncated=True)


def parse_output(text: str, is_truncated: bool) -> dict[str, Any]:
    """The result stored for a job."""
    return {"text": text.strip(), "input_truncated": is_truncated}
