"""The OpenAI Batch API's file formats: request lines in (`/v1/chat/completions`), result lines out.

A request's body becomes a document of its own (canonical JSON, `CHAT_MEDIA_TYPE`), so identical
requests are one job, and the worker rebuilds the request from it. What docbatch cannot honour
(several choices, tools, streaming, image parts) is refused per request with a clear message rather
than quietly ignored; fields that do not change the answer (`model`, `user`, `metadata`, `store`) are
accepted and not used.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.tasks import schema_error

CHAT_MEDIA_TYPE = "application/vnd.docbatch.chat-request+json"
CHAT_URL = "/v1/chat/completions"
TASK_URL_PREFIX = "/v1/docbatch/tasks/"  # the HTTP API's own lines: a docbatch task on an uploaded document
IGNORED_FIELDS = {"model", "user", "metadata", "store", "seed", "service_tier"}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content: Any) -> Any:
        """Content given as parts: text parts are joined; any other part is refused."""
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"content parts of type {kind!r} are not supported (text parts only)")
            texts.append(part["text"])
        return "\n".join(texts)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema")
        return self


class ChatRequest(BaseModel):
    """The part of a chat completion request body that decides the answer."""

    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Literal[1] = 1
    response_format: ResponseFormat | None = None

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must match: the given one, any object for `json_object`, else None."""
        if self.response_format is None or self.response_format.type == "text":
            return None
        if self.response_format.type == "json_object":
            return {"type": "object"}
        return self.response_format.json_schema.json_schema

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as a chat template takes them (`developer` is the newer name for `system`)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]

    def canonical_bytes(self) -> bytes:
        # Fields in the model's order; a response schema keeps its own order (the order of the answer).
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_defaults=True),
                          separators=(",", ":"), ensure_ascii=False).encode()


class InvalidRequest(ValueError):
    """A request line docbatch cannot run, and its custom_id when that much could be read."""

    def __init__(self, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.custom_id = custom_id


def _envelope(line: str, url: str | None) -> tuple[str, str, dict[str, Any]]:
    """A request line's `custom_id`, `url` and `body` (the url must be `url` when given)."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"not JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(request, dict):
        raise InvalidRequest("a request line must be a JSON object")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise InvalidRequest("custom_id must be a non-empty string")
    if request.get("method", "POST") != "POST":
        raise InvalidRequest(f"method must be POST, not {request.get('method')!r}", custom_id)
    if url is not None and request.get("url") != url:
        raise InvalidRequest(f"url must be {url}, not {request.get('url')!r}", custom_id)
    body = request.get("body")
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object", custom_id)
    return custom_id, request.get("url"), body


def parse_request_line(line: str) -> tuple[str, ChatRequest]:
    """A request line's `custom_id` and body; `InvalidRequest` says what is wrong with it."""
    custom_id, _, body = _envelope(line, CHAT_URL)
    body = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    try:
        chat = ChatRequest.model_validate(body)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors())
        raise InvalidRequest(f"invalid body: {problems}", custom_id) from e
    if (schema := chat.answer_schema()) is not None and (error := schema_error(schema)):
        raise InvalidRequest(f"response_format: {error}", custom_id)
    return custom_id, chat


def task_url(task_name: str) -> str:
    """The url of a line that runs docbatch's task `task_name` on an uploaded document (an HTTP API extension)."""
    return f"{TASK_URL_PREFIX}{task_name}"


def parse_document_line(line: str, url: str) -> tuple[str, str]:
    """A docbatch task line's `custom_id` and the `file_id` of the document it runs on: `{"custom_id", "method":
    "POST", "url": "/v1/docbatch/tasks/<task>", "body": {"file_id": "file-..."}}`."""
    custom_id, _, body = _envelope(line, url)
    file_id = body.get("file_id")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest("body.file_id must name a file uploaded with purpose user_data", custom_id)
    if unknown := sorted(set(body) - {"file_id"}):
        raise InvalidRequest(f"body may hold only file_id, not {', '.join(unknown)}", custom_id)
    return custom_id, file_id


def output_line(*, custom_id: str, job_id: str | None, model: str, created: int, content: str | None,
                finish_reason: str | None, prompt_tokens: int, completion_tokens: int,
                error_code: str | None, error_message: str | None) -> dict[str, Any]:
    """One line of an OpenAI Batch output file: a chat completion in `response.body`, or `error`."""
    line_id = f"batch_req_{job_id or custom_id}"
    if error_code is not None:
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": error_code, "message": error_message or ""}}
    body = {
        "id": f"chatcmpl-{job_id}", "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
    return {"id": line_id, "custom_id": custom_id, "response": {"status_code": 200, "request_id": job_id, "body": body},
            "error": None}
