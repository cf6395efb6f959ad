"""Store rows as OpenAI's objects: `file`, `batch`, and the `list` page with `first_id`, `last_id`, `has_more`."""
from __future__ import annotations

import datetime as dt
from typing import Any

from schemas.sql.models import ApiBatch, ApiFile

BATCH_PREFIX = "batch_"


def unix(moment: dt.datetime | None) -> int | None:
    if moment is None:
        return None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp())


def batch_api_id(batch_id: str) -> str:
    """The id the API shows for docbatch batch `batch_id`."""
    return f"{BATCH_PREFIX}{batch_id}"


def file_object(row: ApiFile) -> dict[str, Any]:
    return {"id": row.id, "object": "file", "bytes": row.size_bytes, "created_at": unix(row.created_at),
            "expires_at": unix(row.expires_at), "filename": row.filename, "purpose": row.purpose,
            "status": "processed", "status_details": None}


def batch_object(row: ApiBatch, model: str) -> dict[str, Any]:
    times = {f"{name}_at": unix(getattr(row, f"{name}_at")) for name in (
        "created", "in_progress", "expires", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")}
    errors = {"object": "list", "data": row.errors} if row.errors else None
    return {
        "id": batch_api_id(row.id), "object": "batch", "endpoint": row.endpoint, "model": model, "errors": errors,
        "input_file_id": row.input_file_id, "completion_window": row.completion_window, "status": row.status,
        "output_file_id": row.output_file_id, "error_file_id": row.error_file_id, **times,
        "request_counts": {"total": row.num_total, "completed": row.num_completed, "failed": row.num_failed},
        "usage": {"input_tokens": row.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": row.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": row.input_tokens + row.output_tokens},
        "metadata": row.metadata_,
    }


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}
