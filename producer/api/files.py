"""`/v1/files`: upload, list, retrieve, content, delete, scoped to the caller's key.

An upload is parsed by Starlette into a temporary file (in memory up to 1 MiB, then on disk) while the route's body
limit (`limits.py`) counts its bytes (413 on `Content-Length` or as soon as the count passes it), then copied into the store one
1 MiB part at a time. A download is streamed the same way. A `user_data` file is a document for a docbatch task
(`/v1/docbatch/tasks/...` lines), stored where workers read documents.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any, Iterator, Literal

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response, StreamingResponse

from producer.api.auth import caller
from producer.api.context import ApiContext, context
from producer.api.errors import ApiError, not_found
from producer.api.objects import file_object, list_page
from schemas.settings import Settings
from schemas.sql.api_files import CHUNK_BYTES
from schemas.sql.models import ApiFile, utcnow
from worker.documents.extract import sniff

PURPOSES = ("batch", "user_data")
EXPIRES_AFTER_S = (3600, 30 * 86400)  # OpenAI's bounds for expires_after.seconds


def live_file(ctx: ApiContext, key_id: str, file_id: str) -> ApiFile:
    """The key's file with its content, or 404 (none, or another key's), or 410 (expired: content gone)."""
    row = ctx.store.get_api_file(key_id, file_id)
    if row is None:
        raise not_found("File", file_id)
    if row.expired_at is not None:
        raise ApiError(410, f"File {file_id} expired at {row.expired_at.isoformat(timespec='seconds')}; its "
                            "content is gone", code="file_expired")
    return row


def _parts(upload: UploadFile) -> Iterator[bytes]:
    while data := upload.file.read(CHUNK_BYTES):
        yield data


def router(settings: Settings) -> APIRouter:
    api = APIRouter(prefix="/v1/files", dependencies=[Depends(caller)])

    @api.post("")
    def upload(file: UploadFile = File(...), purpose: str = Form(...),
               anchor: str | None = Form(None, alias="expires_after[anchor]"),
               seconds: int | None = Form(None, alias="expires_after[seconds]"),
               key_id: str = Depends(caller), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
        if purpose not in PURPOSES:
            raise ApiError(400, f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose")
        limit = settings.api_max_upload_bytes if purpose == "batch" else settings.max_file_bytes
        if file.size is not None and file.size > limit:
            raise ApiError(413, f"the file has {file.size} bytes, over the limit of {limit} for purpose {purpose}",
                           code="file_too_large", param="file")
        expires_at = _expiry(anchor, seconds)
        filename = file.filename or "upload"
        if purpose == "batch":
            return file_object(ctx.store.add_api_file(key_id, purpose, filename, _parts(file), expires_at=expires_at))
        data = file.file.read()  # a document: at most max_file_bytes, and a worker reads it whole anyway
        sha = hashlib.sha256(data).hexdigest()
        ctx.store.put_document(sha, data, sniff(data))
        return file_object(ctx.store.add_api_document_file(key_id, filename, sha, len(data), expires_at))

    @api.get("")
    def list_files(after: str | None = None, limit: int = Query(10_000, ge=1, le=10_000),
                   order: Literal["asc", "desc"] = "desc", purpose: str | None = None,
                   key_id: str = Depends(caller), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
        rows, has_more = ctx.store.api_files(key_id, after=after, limit=limit, descending=order == "desc",
                                             purpose=purpose)
        return list_page([file_object(row) for row in rows], has_more)

    @api.get("/{file_id}")
    def retrieve(file_id: str, key_id: str = Depends(caller), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
        return file_object(live_file(ctx, key_id, file_id))

    @api.get("/{file_id}/content")
    def content(file_id: str, key_id: str = Depends(caller), ctx: ApiContext = Depends(context)) -> Response:
        row = live_file(ctx, key_id, file_id)
        headers = {"Content-Length": str(row.size_bytes)}
        if row.document_sha256 is not None:
            data, media_type = ctx.store.read_document(row.document_sha256)
            return Response(data, media_type=media_type, headers=headers)
        return StreamingResponse(ctx.store.api_file_parts(row.id), media_type="application/octet-stream",
                                 headers=headers)

    @api.delete("/{file_id}")
    def remove(file_id: str, key_id: str = Depends(caller), ctx: ApiContext = Depends(context)) -> dict[str, Any]:
        if not ctx.store.delete_api_file(key_id, file_id):
            raise not_found("File", file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    return api


def _expiry(anchor: str | None, seconds: int | None) -> dt.datetime | None:
    if anchor is None and seconds is None:
        return None
    low, high = EXPIRES_AFTER_S
    if anchor != "created_at" or seconds is None or not low <= seconds <= high:
        raise ApiError(400, f"expires_after needs anchor 'created_at' and seconds between {low} and {high}",
                       param="expires_after")
    return utcnow() + dt.timedelta(seconds=seconds)
