"""The HTTP API's keys and files in the store (mixed into `schemas.sql.store.Store`).

A file's bytes are written in parts (`ApiFileChunk`, at most `CHUNK_BYTES` each) inside the transaction that
makes its row, so a file is there whole or not at all, and neither an upload nor a download is ever held whole
in memory. A `user_data` file is a docbatch document instead (workers read documents), referred to by hash.
"""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Iterable, Iterator

from sqlalchemy import and_, delete, func, or_, select, update

from schemas.sql.models import ApiFile, ApiFileChunk, ApiKey, utcnow

CHUNK_BYTES = 1 << 20


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def page_after(query: Any, model: Any, after: Any | None, descending: bool) -> Any:
    """`query` ordered by (created_at, id), newest first when `descending`, from just past the row `after`."""
    if after is not None:
        older = (model.created_at < after.created_at) if descending else (model.created_at > after.created_at)
        tie = model.id < after.id if descending else model.id > after.id
        query = query.where(or_(older, and_(model.created_at == after.created_at, tie)))
    keys = (model.created_at.desc(), model.id.desc()) if descending else (model.created_at, model.id)
    return query.order_by(*keys)


class ApiFileStore:
    """Keys and files of the HTTP API. Every read of a file is scoped to the key that owns it."""

    _sessions: Any

    # -- keys ------------------------------------------------------------------------------------------
    def add_api_key(self, key_id: str, name: str, secret_sha256: str) -> None:
        """Record a key; ValueError if the name is taken."""
        with self._sessions.begin() as session:
            if session.scalar(select(ApiKey.id).where(ApiKey.name == name)) is not None:
                raise ValueError(f"a key named {name!r} exists already")
            session.add(ApiKey(id=key_id, name=name, secret_sha256=secret_sha256, created_at=utcnow()))

    def get_api_key(self, key_id: str) -> ApiKey | None:
        with self._sessions() as session:
            return session.get(ApiKey, key_id)

    def api_keys(self) -> list[ApiKey]:
        with self._sessions() as session:
            return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def revoke_api_key(self, name: str) -> bool:
        """Revoke the key named `name` (its files and batches stay); False if there is no such live key."""
        with self._sessions.begin() as session:
            return bool(session.execute(update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                                        .values(revoked_at=utcnow())).rowcount)

    def num_live_api_keys(self) -> int:
        with self._sessions() as session:
            return session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None)))

    # -- files -----------------------------------------------------------------------------------------
    def add_api_file(self, key_id: str, purpose: str, filename: str, parts: Iterable[bytes], *,
                     expires_at: dt.datetime | None = None, file_id: str | None = None, session: Any = None) -> ApiFile:
        """Store a file from `parts` (each at most CHUNK_BYTES), read one at a time, in one transaction (the
        caller's `session`, when given)."""
        if session is None:
            with self._sessions.begin() as own:
                return self.add_api_file(key_id, purpose, filename, parts, expires_at=expires_at, file_id=file_id,
                                         session=own)
        row = ApiFile(id=file_id or new_file_id(), key_id=key_id, purpose=purpose, filename=filename, size_bytes=0,
                      created_at=utcnow(), expires_at=expires_at)
        session.add(row)
        session.flush()
        size = 0
        for seq, data in enumerate(parts):
            session.add(ApiFileChunk(file_id=row.id, seq=seq, data=data))
            session.flush()  # one part in memory at a time
            size += len(data)
        row.size_bytes = size
        return row

    def add_api_document_file(self, key_id: str, filename: str, sha256: str, size_bytes: int,
                              expires_at: dt.datetime | None = None) -> ApiFile:
        """A `user_data` file whose bytes are the stored document `sha256`."""
        with self._sessions.begin() as session:
            row = ApiFile(id=new_file_id(), key_id=key_id, purpose="user_data", filename=filename,
                          size_bytes=size_bytes, document_sha256=sha256, created_at=utcnow(), expires_at=expires_at)
            session.add(row)
            return row

    def get_api_file(self, key_id: str, file_id: str) -> ApiFile | None:
        """The key's file (an expired one too: see `expired_at`); None for another key's or no such id."""
        with self._sessions() as session:
            return session.scalar(select(ApiFile).where(ApiFile.id == file_id, ApiFile.key_id == key_id))

    def api_files(self, key_id: str, *, after: str | None, limit: int, descending: bool = True,
                  purpose: str | None = None) -> tuple[list[ApiFile], bool]:
        """A page of the key's live files and whether more follow; `after` a file id (unknown: from the start)."""
        with self._sessions() as session:
            cursor = session.scalar(select(ApiFile).where(ApiFile.id == after, ApiFile.key_id == key_id)) \
                if after else None
            query = select(ApiFile).where(ApiFile.key_id == key_id, ApiFile.expired_at.is_(None))
            if purpose:
                query = query.where(ApiFile.purpose == purpose)
            rows = list(session.scalars(page_after(query, ApiFile, cursor, descending).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def delete_api_file(self, key_id: str, file_id: str) -> bool:
        """Delete the key's file and its bytes (a document stays while a job refers to it)."""
        with self._sessions.begin() as session:
            return bool(session.execute(delete(ApiFile).where(ApiFile.id == file_id, ApiFile.key_id == key_id))
                        .rowcount)

    def api_file_parts(self, file_id: str) -> Iterator[bytes]:
        """A file's bytes, one part per query, so a download holds one part at a time."""
        with self._sessions() as session:
            count = session.scalar(select(func.count()).select_from(ApiFileChunk)
                                   .where(ApiFileChunk.file_id == file_id))
        for seq in range(count):
            with self._sessions() as session:
                data = session.scalar(select(ApiFileChunk.data).where(ApiFileChunk.file_id == file_id,
                                                                      ApiFileChunk.seq == seq))
            if data is None:  # deleted or expired while it was being read
                return
            yield bytes(data)

    def expire_api_files(self, now: dt.datetime, limit: int = 100) -> int:
        """Purge the bytes of files past `expires_at` and keep their rows as tombstones; returns how many."""
        with self._sessions.begin() as session:
            ids = list(session.scalars(select(ApiFile.id).where(ApiFile.expires_at < now, ApiFile.expired_at.is_(None))
                                       .limit(limit)))
            if ids:
                session.execute(delete(ApiFileChunk).where(ApiFileChunk.file_id.in_(ids)))
                session.execute(update(ApiFile).where(ApiFile.id.in_(ids)).values(expired_at=now))
            return len(ids)
