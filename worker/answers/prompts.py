"""Turning a job's input into chat-templated prompt tokens within the budget, and checking answers."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import jsonschema
from pydantic import BaseModel, ValidationError

from schemas.states import DocbatchError, ErrorCode
from schemas.tasks import TaskDefinition
from worker.engine.request import ModelInput

# The chat template's own tokens and a chunk's label fit well within this, above the task prompt itself.
TEMPLATE_RESERVE_TOKENS = 128


@dataclass(frozen=True)
class Prompt:
    model_input: ModelInput
    is_truncated: bool


def prompt_reserve(task: TaskDefinition, count_tokens: Callable[[str], int]) -> int:
    """Tokens a request of `task` needs besides the document's text: chunks are planned below the rest."""
    return max(count_tokens(task.render("", filename="", media_type="", num_pages=0, sha256="")),
               count_tokens(task.render_reduce(""))) + TEMPLATE_RESERVE_TOKENS


def build_text_prompt(tokenizer: Any, render: Callable[[str], str], text: str, max_input_tokens: int) -> Prompt:
    """Chat-template the user turn `render(text)`, cutting the text if the prompt would not fit.

    Long documents are chunked before they get here, so a cut is a last resort (`is_truncated`)."""
    def encode(document: str) -> list[int]:
        return chat_tokens(tokenizer, [{"role": "user", "content": render(document)}])

    overhead = len(encode(""))
    doc_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = max_input_tokens - overhead
    if room <= 0:
        raise ValueError(f"input budget {max_input_tokens} is smaller than the prompt itself ({overhead})")
    if len(doc_ids) <= room:
        return Prompt(ModelInput(encode(text)), is_truncated=False)
    return Prompt(ModelInput(encode(tokenizer.decode(doc_ids[:room]))), is_truncated=True)


def chat_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


@lru_cache(maxsize=64)
def _validator(schema_text: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate_json(schema_text: str, text: str, model: type[BaseModel] | None = None) -> Any:
    """The answer parsed and checked against the schema (formats such as `date` included), then, for a
    built-in task, validated by its pydantic `model` (and dumped in that model's JSON form).

    Raises `DocbatchError(schema_invalid)`; constrained decoding makes that rare (an answer cut off by
    `max_new_tokens`)."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as e:
        # some of json's messages end in "at" ("Unterminated string starting at"), others do not
        raise DocbatchError(ErrorCode.SCHEMA_INVALID,
                            f"the answer is not JSON: {e.msg.removesuffix(' at')} at character {e.pos}") from e
    errors = sorted(_validator(schema_text).iter_errors(answer), key=lambda err: list(err.absolute_path))
    if errors:
        where = "/".join(str(p) for p in errors[0].absolute_path) or "the answer"
        raise DocbatchError(ErrorCode.SCHEMA_INVALID, f"{where}: {errors[0].message} ({len(errors)} errors)")
    if model is None:
        return answer
    try:
        return model.model_validate(answer).model_dump(mode="json")
    except ValidationError as e:
        raise DocbatchError(ErrorCode.SCHEMA_INVALID, f"not a valid {model.__name__}: {e.errors()[0]['msg']} "
                                                      f"({e.error_count()} errors)") from e
