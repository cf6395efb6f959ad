"""Task prompts and turning a document into chat-templated prompt tokens within the input budget."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

SYSTEM = "You are a careful analyst of legal and financial documents. Use only facts stated in the document."


@dataclass(frozen=True)
class TaskSpec:
    name: str
    instruction: str
    wants_json: bool


TASKS: dict[str, TaskSpec] = {
    "summarize": TaskSpec(
        "summarize",
        "Summarize this contract in a few sentences: the parties and their roles, the dates and term, "
        "payment, renewal and termination terms, governing law and any cap on liability.",
        wants_json=False),
    "extract": TaskSpec(
        "extract",
        "Extract the key figures of this financial report as one JSON object with the keys company, "
        "period, currency, revenue, net_income, total_assets, total_liabilities and equity. "
        "Use null for anything the report does not state. Answer with the JSON object only.",
        wants_json=True),
}


def task_params(max_new_tokens: int) -> dict[str, Any]:
    """The parameters that, with document, task and model, identify a job (its idempotency key)."""
    return {"max_new_tokens": max_new_tokens, "prompt_version": 1}


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    is_truncated: bool


def build_prompt(tokenizer: Any, task: TaskSpec, text: str, max_input_tokens: int) -> Prompt:
    """Chat-template the task over the document, cutting the document so the prompt fits the budget."""
    def encode(document: str) -> list[int]:
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"{task.instruction}\n\nDocument:\n\n{document}"}]
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


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_output(task: TaskSpec, text: str, is_truncated: bool) -> dict[str, Any]:
    """The result stored for a job. JSON tasks keep the parsed object when the text holds one."""
    data: dict[str, Any] = {"text": text.strip(), "input_truncated": is_truncated}
    if task.wants_json:
        match = _JSON_OBJECT.search(text)
        try:
            data["json"] = json.loads(match.group(0)) if match else None
        except json.JSONDecodeError:
            data["json"] = None
    return data
