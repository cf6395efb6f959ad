"""`--openai-batch`: an OpenAI Batch input file in, the matching output file out.

Each request line's body is stored as a document of its own and its `custom_id` is its name in the
batch, so ids come back exactly as they went in. A line docbatch cannot run becomes a failed record
(`invalid_request`, with the line number) and the other lines go on; duplicate custom_ids refuse the file,
since the output could not tell their answers apart.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from schemas.openai import CHAT_MEDIA_TYPE, InvalidRequest, output_line, parse_request_line
from schemas.records import JobRecord
from schemas.states import ErrorCode, JobState
from schemas.sql.store import Reject, Store


def store_requests(store: Store, path: Path) -> tuple[list[tuple[str, str]], list[Reject], int]:
    """Store each valid request body; returns (custom_id, sha256) items, rejected lines, new documents.

    Raises ValueError for a file that cannot be read as UTF-8 JSON lines or repeats a custom_id."""
    items: list[tuple[str, str]] = []
    rejects: list[Reject] = []
    first_line: dict[str, int] = {}
    num_new = 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} as UTF-8 JSON lines: {e}") from e
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            custom_id, request = parse_request_line(line)
        except InvalidRequest as e:
            custom_id, request = e.custom_id, None
            rejects.append(Reject(custom_id or f"line {line_no}", ErrorCode.INVALID_REQUEST, f"line {line_no}: {e}"))
        if custom_id is not None:
            if custom_id in first_line:
                raise ValueError(f"{path}: custom_id {custom_id!r} is on lines {first_line[custom_id]} and {line_no}; "
                                 "custom_ids must be unique within a file")
            first_line[custom_id] = line_no
        if request is not None:
            body = request.canonical_bytes()
            sha = hashlib.sha256(body).hexdigest()
            num_new += store.put_document(sha, body, CHAT_MEDIA_TYPE)
            items.append((custom_id, sha))
    if not first_line and not rejects:
        raise ValueError(f"{path} holds no requests")
    return items, rejects, num_new


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
