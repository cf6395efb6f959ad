"""Task definitions: what to ask of each document, what shape the answer must have, how to decode it.

The built-in tasks (`summarize`, `extract`, and `chat` for OpenAI Batch requests) and custom tasks from a
TOML file (`docbatch submit --task-file`) are the same object. A batch stores the definition it ran with,
and the definition's hash is part of every job's identity: results stay reproducible, and a changed
prompt, schema or decoding setting is new work rather than a silent mix.

Prompts are Jinja2 templates of the user's turn, rendered in a sandbox with undefined variables an error.
A document task's prompt holds `{{ text }}` exactly once (the document, a part of one, or for the reduce
prompt the answers to combine) and may use the document's metadata (`TEMPLATE_VARIABLES`).
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from schemas.outputs import ContractSummary, FinancialReport
from schemas.settings import Settings

TEMPLATE_VARIABLES = {
    "text": "the document's text (for a long document: one part of it, labelled)",
    "filename": "the name the document was submitted under (then the name is part of the job's identity)",
    "media_type": "the sniffed type, e.g. application/pdf",
    "num_pages": "the number of pages",
    "sha256": "the document's content hash",
}
CHAT_TASK = "chat"
_SENTINEL = "\x00docbatch-text\x00"
_ENV = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)

DEFAULT_REDUCE_PROMPT = (
    "{{ text }}\n\nThese are answers for consecutive parts of one document: either the parts' own answers, or "
    "one answer merged from them with the values the parts disagree on listed. Give one answer for the whole "
    "document: resolve each disagreement, combine text fields, keep every stated fact, and use null for "
    "anything no part states.")


class Generation(BaseModel):
    """Decoding settings. `temperature` 0 decodes greedily; above 0 it samples (with `top_p`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_new_tokens: int = Field(ge=1, le=32768)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    ignore_eos: bool = False  # benchmarks only: every answer runs to max_new_tokens, free text, unchecked


class TaskDefinition(BaseModel):
    """One task, complete: everything a worker needs to turn a document into a checked answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    kind: Literal["document", "chat"] = "document"  # chat: the document is an OpenAI chat request body
    prompt: str = ""
    reduce_prompt: str = DEFAULT_REDUCE_PROMPT
    json_schema: dict[str, Any] | None = None  # the answer is JSON matching it, enforced while decoding
    # built-ins: the answer's pydantic model (validated after the schema) and its consistency checks
    checks: Literal["summarize", "extract"] | None = None
    generation: Generation

    @model_validator(mode="after")
    def _check(self) -> "TaskDefinition":
        if self.kind == "document":
            _check_template("prompt", self.prompt, set(TEMPLATE_VARIABLES))
            _check_template("reduce_prompt", self.reduce_prompt, {"text"})
        if self.json_schema is not None:
            if error := schema_error(self.json_schema):
                raise ValueError(f"json_schema: {error}")
        return self

    @cached_property
    def hash(self) -> str:
        # Not sorted: a schema's property order is part of the task (it is the order the answer is written in).
        canonical = json.dumps(self.model_dump(mode="json"), separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @cached_property
    def schema_text(self) -> str | None:
        return schema_text(self.json_schema) if self.json_schema is not None else None

    @property
    def output_model(self) -> type[BaseModel] | None:
        return {"summarize": ContractSummary, "extract": FinancialReport}.get(self.checks or "")

    @cached_property
    def uses_filename(self) -> bool:
        return "filename" in _variables(self.prompt)

    @cached_property
    def uses_stored_metadata(self) -> bool:
        """Whether the prompt reads what the store knows of a document (type, pages, hash)."""
        return bool(_variables(self.prompt) & {"media_type", "num_pages", "sha256"})

    def render(self, text: str, **metadata: Any) -> str:
        """The user's turn for one document (or one part of it)."""
        return _ENV.from_string(self.prompt).render(text=text, **metadata)

    def render_reduce(self, text: str) -> str:
        """The user's turn that combines the answers for the parts of a long document."""
        return _ENV.from_string(self.reduce_prompt).render(text=text)

    def around_text(self, *, reduce: bool = False, **metadata: Any) -> tuple[str, str]:
        """The prompt's text before and after `{{ text }}` (a vision prompt puts page images in between)."""
        rendered = self.render_reduce(_SENTINEL) if reduce else self.render(_SENTINEL, **metadata)
        before, after = rendered.split(_SENTINEL)
        return before, after


def _variables(template: str) -> set[str]:
    return jinja2.meta.find_undeclared_variables(_ENV.parse(template))


def _check_template(field: str, template: str, allowed: set[str]) -> None:
    try:
        names = _variables(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{field}: template error on line {e.lineno}: {e.message}") from e
    if unknown := names - allowed:
        raise ValueError(f"{field}: unknown variable(s) {', '.join(sorted(unknown))}; "
                         f"available: {', '.join(sorted(allowed))}")
    rendered = _ENV.from_string(template).render(text=_SENTINEL, **{n: "x" for n in names - {"text"}})
    if rendered.count(_SENTINEL) != 1:
        raise ValueError(f"{field}: must use {{{{ text }}}} exactly once (found {rendered.count(_SENTINEL)})")


def schema_text(schema: dict[str, Any]) -> str:
    """A JSON schema as constrained decoding gets it: keys in their given order, which llguidance keeps
    for the properties of the answer (sorting them would make the model write the fields alphabetically)."""
    return json.dumps(schema, ensure_ascii=False)


def schema_error(schema: dict[str, Any]) -> str:
    """Why `schema` cannot constrain decoding (not a JSON schema, or not one llguidance compiles); '' if it can."""
    return _schema_error(schema_text(schema))


@lru_cache(maxsize=256)
def _schema_error(text: str) -> str:
    """`schema_error` once per distinct schema: a batch file repeats the same schema on many lines."""
    import jsonschema
    from llguidance import LLMatcher

    schema = json.loads(text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return f"not a valid JSON schema: {e.message}"
    grammar = LLMatcher.grammar_from_json_schema(text, overrides={"whitespace_flexible": False})
    return LLMatcher.validate_grammar(grammar)


# The built-in tasks put the document first and their instructions after it, so that a document's tasks share its
# text as a prompt prefix (the vLLM engine computes it once for all of them); the document is set off by quotes, with
# which the packaged small model answers as well as with the instructions first (benchmarks/prompt_layout.py).
DOCUMENT = 'Document:\n"""\n{{ text }}\n"""'
INSTRUCTIONS = {
    "summarize": "Summarize this contract as JSON: a summary of a few sentences, the parties and their roles, the "
                 "agreement, effective and expiration dates, term, renewal, payment terms, termination, governing law, "
                 "liability cap and key obligations. Use null for anything the contract does not state.",
    "extract": "Extract this financial report as JSON: company, report type, period, currency (ISO code), unit "
               "scale, revenue, cost of revenue, operating income, net income, EPS basic and diluted, total assets, "
               "total liabilities, equity, cash, operating cash flow, capital expenditure and segment revenues. "
               "Numbers as numbers in the stated unit; null for anything the report does not state."}
BUILTIN_TASKS = tuple(INSTRUCTIONS)


def builtin_task(name: str, settings: Settings) -> TaskDefinition:
    """`summarize`, `extract` or `chat`, with the decoding settings of `settings`."""
    generation = Generation(max_new_tokens=settings.max_new_tokens, repetition_penalty=settings.repetition_penalty,
                            ignore_eos=settings.ignore_eos)
    prompt = f"{DOCUMENT}\n\n{INSTRUCTIONS.get(name, '')}"
    if name == "summarize":
        return TaskDefinition(name=name, prompt=prompt, json_schema=ContractSummary.model_json_schema(),
                              checks="summarize", generation=generation)
    if name == "extract":
        reduce_prompt = DEFAULT_REDUCE_PROMPT + " Where parts disagree on a figure, prefer the one stated as a total."
        return TaskDefinition(name=name, prompt=prompt, reduce_prompt=reduce_prompt,
                              json_schema=FinancialReport.model_json_schema(), checks="extract", generation=generation)
    if name == CHAT_TASK:
        # OpenAI's defaults for what a request leaves out: temperature 1, no repetition penalty.
        return TaskDefinition(name=name, kind="chat", generation=Generation(
            max_new_tokens=settings.max_new_tokens, temperature=1.0, ignore_eos=settings.ignore_eos))
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(BUILTIN_TASKS)}, or use --task-file")


def load_task_file(path: Path, settings: Settings) -> TaskDefinition:
    """A custom task from TOML: `name`, `prompt`, optional `reduce_prompt`, `json_schema` (a table) or
    `json_schema_file` (a path relative to the TOML file), and a `[generation]` table whose missing keys
    come from `settings`. Raises ValueError with every problem found."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read task file {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from e
    if schema_file := data.pop("json_schema_file", None):
        if "json_schema" in data:
            raise ValueError(f"{path}: give json_schema or json_schema_file, not both")
        schema_path = path.parent / schema_file
        try:
            data["json_schema"] = json.loads(schema_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot load json_schema_file {schema_path}: {e}") from e
    generation = {"max_new_tokens": settings.max_new_tokens, "repetition_penalty": settings.repetition_penalty,
                  **data.pop("generation", {})}
    try:
        return TaskDefinition(**data, generation=generation)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'task'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"{path}: {problems}") from e
