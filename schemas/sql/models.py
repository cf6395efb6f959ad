"""SQLAlchemy 2.0 models: the system of record. Redis only ever carries job ids."""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Enum, ForeignKey, Index, Integer, LargeBinary, String,
                        Text, false)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, deferred, mapped_column, relationship

from schemas.states import JobState

JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: DateTime(timezone=True), dict[str, Any]: JsonType}


class Document(Base):
    """A file's bytes, content-addressed. `content` holds them inline, or `blob_uri` says where they are."""

    __tablename__ = "documents"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(100))
    content: Mapped[bytes | None] = deferred(mapped_column(LargeBinary, nullable=True))
    blob_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Page(Base):
    """One extracted page, so a retried inference does not extract again.

    `source` says where `text` came from: the text layer (`text`), Tesseract (`ocr`), or nothing yet
    (`image`: a scan whose rendered image, stored as a document, goes to a vision model)."""

    __tablename__ = "pages"
    document_sha256: Mapped[str] = mapped_column(ForeignKey("documents.sha256", ondelete="CASCADE"), primary_key=True)
    page_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16), default="text", server_default="text")
    image_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class TaskDef(Base):
    """A task definition (`schemas.tasks.TaskDefinition`) as a batch ran it, keyed by its hash. Kept as JSON
    text, not JSONB: a schema's property order is the order the model writes the answer in."""

    __tablename__ = "task_defs"
    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    definition: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Batch(Base):
    """One `submit`: the jobs it lists, including ones an earlier batch already ran."""

    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    task: Mapped[str] = mapped_column(String(100))
    task_hash: Mapped[str | None] = mapped_column(ForeignKey("task_defs.hash", name="fk_batches_task_hash"),
                                                  nullable=True)
    model: Mapped[str] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Text, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    items: Mapped[list["BatchItem"]] = relationship(back_populates="batch", cascade="all, delete-orphan")


class BatchReject(Base):
    """A path a batch could not take in at all (FIFO, symlink out of the folder, too large, unreadable)."""

    __tablename__ = "batch_rejects"
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    error_code: Mapped[str] = mapped_column(String(64))
    error_message: Mapped[str] = mapped_column(Text)


class BatchItem(Base):
    """A job as one batch lists it, under the name it was submitted with (a file name, or an OpenAI
    request's `custom_id`). Two names with the same content share one job."""

    __tablename__ = "batch_items"
    __table_args__ = (Index("ix_batch_items_job_id", "job_id"),)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch: Mapped[Batch] = relationship(back_populates="items")
    job: Mapped["Job"] = relationship()


class Job(Base):
    """Document x task x params x model. `idempotency_key` is unique, so the same work is never made twice."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state", "state"), Index("ix_jobs_parent_id", "parent_id"),
                      Index("ix_jobs_lease_owner", "lease_owner"))
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    idempotency_key: Mapped[str] = mapped_column(String(64), unique=True)
    document_sha256: Mapped[str] = mapped_column(ForeignKey("documents.sha256"))
    task: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]]
    model: Mapped[str] = mapped_column(Text)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e]),
        default=JobState.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)  # the last worker's name (gpu0@host)
    # A held job (preparing, running) is leased to one process, which renews the lease while it lives.
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)  # `Worker.owner`
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)  # its last message to the broker
    # Crash attribution: how often a worker died holding it, and whether its next run goes alone.
    lost_runs: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    isolate: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_in: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens_out: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    prepared_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    # Long documents: chunk jobs (map, level 1; reduce groups, level 2+) under the document's job.
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE", name="fk_jobs_parent_id"),
                                                  nullable=True)
    chunk_level: Mapped[int | None] = mapped_column(Integer, nullable=True)
    chunk_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    num_chunks: Mapped[int | None] = mapped_column(Integer, nullable=True)  # on a parent: chunks of its last level
    chunks_done: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    input_parts: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType, nullable=True)
    document: Mapped[Document] = relationship()
    result: Mapped["Result | None"] = relationship(back_populates="job", uselist=False)


class Result(Base):
    """What the model produced for a job: parsed JSON plus the raw text it came from."""

    __tablename__ = "results"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    data: Mapped[dict[str, Any]]
    raw_text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    job: Mapped[Job] = relationship(back_populates="result")


class Worker(Base):
    """A running worker process, registered at start and kept alive by its heartbeat: who holds what."""

    __tablename__ = "workers"
    owner: Mapped[str] = mapped_column(String(200), primary_key=True)  # name/pid: unique per process life
    name: Mapped[str] = mapped_column(String(200))  # Celery node name, e.g. gpu0@host
    role: Mapped[str] = mapped_column(String(16))  # infer or prepare
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


# -- the HTTP API (producer/api, docs/API.md): keys, files and OpenAI's batch objects ----------------------------
class ApiKey(Base):
    """A key of the HTTP API, `dbk_<id>_<secret>`: only the secret's sha256 is kept (it has 256 bits of entropy,
    so a plain hash suffices)."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class ApiFile(Base):
    """A file as OpenAI's Files API shows it, owned by one key. Its bytes are `ApiFileChunk`s, or for a
    `user_data` file (a document for a docbatch task) the document `document_sha256`. `expired_at` marks a
    tombstone: the content is gone and the id answers 410."""

    __tablename__ = "api_files"
    __table_args__ = (Index("ix_api_files_key_created", "key_id", "created_at"),
                      Index("ix_api_files_expires_at", "expires_at"))
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    document_sha256: Mapped[str | None] = mapped_column(ForeignKey("documents.sha256"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    expired_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)


class ApiFileChunk(Base):
    """One part of a file's bytes (1 MiB), so that no upload or download is held whole in memory."""

    __tablename__ = "api_file_chunks"
    file_id: Mapped[str] = mapped_column(ForeignKey("api_files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ApiBatch(Base):
    """OpenAI's batch object beside the docbatch batch of the same `id` (made by intake): status and its
    times, the counts cached from the jobs (`counted_at`), the output files, and a lease for intake and
    finalizing (any API process may do either; the lease keeps it to one at a time)."""

    __tablename__ = "api_batches"
    __table_args__ = (Index("ix_api_batches_key_created", "key_id", "created_at"),
                      Index("ix_api_batches_status", "status"))
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    endpoint: Mapped[str] = mapped_column(String(200))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JsonType, nullable=True)
    output_expires_s: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    end_status: Mapped[str | None] = mapped_column(String(16), nullable=True)  # what finalizing ends in
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    in_progress_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    finalizing_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    completed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    failed_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    expired_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    cancelling_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    num_total: Mapped[int] = mapped_column(Integer, default=0)
    num_completed: Mapped[int] = mapped_column(Integer, default=0)
    num_failed: Mapped[int] = mapped_column(Integer, default=0)
    num_unfinished: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    counted_at: Mapped[dt.datetime | None] = mapped_column(nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[dt.datetime | None] = mapped_column(nullable=True)
