"""`--openai-batch`: an OpenAI Batch input file in, the matching output file out.

Each request line's body is stored as a document of its own and its `custom_id` is its name in the
batch, so ids come back exactly as they went in. A line docbatch cannot run becomes a failed record
(`invalid_request`, with the line number) and the other lines go on; duplicate custom_ids refuse the file,
since the output could not tell their answers apart.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from schemas.openai import CHAT_MEDIA_TYPE, InvalidRequest, output_line, parse_request_line
from schemas.records import JobRecord
from schemas.states import ErrorCode, JobState
from schemas.sql.store import Reject, Store

DOCUMENTS_PER_TRANSACTION = 1000


@dataclass(frozen=True)
class Request:
    """A request line as a batch takes it: its name (`custom_id`) and document, stored already (`body` None) or
    to be stored."""

    custom_id: str
    sha256: str
    body: bytes | None = None
    media_type: str = CHAT_MEDIA_TYPE


class DuplicateCustomId(ValueError):
    def __init__(self, custom_id: str, first_line: int, line: int) -> None:
        super().__init__(f"custom_id {custom_id!r} is on lines {first_line} and {line}; custom_ids must be unique "
                         "within a file")
        self.line = line


def chat_request(line: str) -> Request:
    """A `/v1/chat/completions` line: its body, canonical, is the document. Raises `InvalidRequest`."""
    custom_id, request = parse_request_line(line)
    body = request.canonical_bytes()
    return Request(custom_id, hashlib.sha256(body).hexdigest(), body)


def store_requests(store: Store, lines: Iterable[str], parse: Callable[[str], Request] = chat_request,
                   ) -> tuple[list[tuple[str, str]], list[Reject], int]:
    """Store each valid request's document (in bulk); returns (custom_id, sha256) items, rejected lines (with
    their numbers), new documents. Raises `DuplicateCustomId`, or ValueError for a file without a line."""
    items: list[tuple[str, str]] = []
    rejects: list[Reject] = []
    first_line: dict[str, int] = {}
    pending: list[tuple[str, bytes, str]] = []
    num_new = 0
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            request = parse(line)
            custom_id = request.custom_id
        except InvalidRequest as e:
            custom_id, request = e.custom_id, None
            rejects.append(Reject(custom_id or f"line {line_no}", ErrorCode.INVALID_REQUEST, f"line {line_no}: {e}",
                                  line=line_no))
        if custom_id is not None:
            if custom_id in first_line:
                raise DuplicateCustomId(custom_id, first_line[custom_id], line_no)
            first_line[custom_id] = line_no
        if request is not None:
            if request.body is not None:
                pending.append((request.sha256, request.body, request.media_type))
            items.append((custom_id, request.sha256))
        if len(pending) >= DOCUMENTS_PER_TRANSACTION:
            num_new += store.put_documents(pending)
            pending = []
    num_new += store.put_documents(pending) if pending else 0
    if not first_line and not rejects:
        raise ValueError("the file holds no requests")
    return items, rejects, num_new


def store_request_file(store: Store, path: Path) -> tuple[list[tuple[str, str]], list[Reject], int]:
    """`store_requests` over an OpenAI Batch input file. Raises ValueError for a file that cannot be read as
    UTF-8 JSON lines or repeats a custom_id."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} as UTF-8 JSON lines: {e}") from e
    try:
        return store_requests(store, lines)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def render_openai(records: Iterable[JobRecord]) -> str:
    """The records as an OpenAI Batch output file: one line per custom_id, a chat completion or an error."""
    lines = []
    for record in records:
        result = record.result or {}
        if record.state == JobState.DONE:
            error_code = error_message = None
        elif record.state.is_terminal:
            error_code, error_message = record.error_code or record.state.value, record.error_message
        else:
            error_code, error_message = "not_finished", f"the request is still {record.state.value}"
        content = result["text"] if "text" in result else json.dumps(result.get("json"), ensure_ascii=False)
        finished = record.finished_at or record.created_at
        lines.append(json.dumps(output_line(
            custom_id=record.name, job_id=record.job_id, model=record.model or "", content=content,
            created=int(finished.timestamp()) if finished else 0, finish_reason=result.get("finish_reason", "stop"),
            prompt_tokens=record.tokens_in or 0, completion_tokens=record.tokens_out or 0,
            error_code=error_code, error_message=error_message), ensure_ascii=False))
    return "".join(line + "\n" for line in lines)
