"""The store: every read and write of the system of record goes through `Store`.

Producers add documents and batches; workers claim jobs with compare-and-set state changes (so a
duplicated message does nothing), record pages, results and failures; the CLI reads counts and records.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import Engine, func, insert, or_, select
from sqlalchemy.exc import SQLAlchemyError

from schemas.sql.api_batches import ApiBatchStore
from schemas.sql.api_files import ApiFileStore
from schemas.sql.control import Control
from schemas.sql.db import chunked, dialect_insert, make_engine, make_sessionmaker, migrate
from schemas.sql.lifecycle import Lifecycle, retried
from schemas.sql.models import (
    Batch,
    BatchItem,
    BatchReject,
    Document,
    Job,
    Page,
    Result,
    TaskDef,
    new_id,
    utcnow,
)
from schemas.states import ErrorCode, JobState


def idempotency_key(document_sha256: str, task: str, params: dict[str, Any], model: str) -> str:
    """sha256 over document, task, canonical params and model: the identity of a unit of work."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{document_sha256}\n{task}\n{canonical}\n{model}".encode()).hexdigest()


@dataclass(frozen=True)
class StoredPage:
    text: str
    source: str  # "text", "ocr" or "image" (see schemas.sql.models.Page)
    image_sha256: str | None = None
    ocr_confidence: float | None = None  # "ocr": Tesseract's mean word confidence (0 to 100)

    def source_column(self) -> str:
        """`source` as the pages table keeps it: an OCR'd page's confidence rides along as `ocr:41` (the table
        has no column of its own for it)."""
        if self.source == "ocr" and self.ocr_confidence is not None:
            return f"ocr:{self.ocr_confidence:.0f}"
        return self.source

    @classmethod
    def from_row(cls, text: str, source: str, image_sha256: str | None) -> "StoredPage":
        kind, _, confidence = source.partition(":")
        return cls(text, kind, image_sha256, float(confidence) if confidence else None)


@dataclass(frozen=True)
class Reject:
    """A submitted path that never became a document, and why."""

    name: str
    code: ErrorCode
    message: str
    line: int | None = None  # an OpenAI Batch line's number in its file


@dataclass(frozen=True)
class NewBatch:
    """What `Store.create_batch` made: the batch, and the jobs that still need a worker."""

    batch_id: str
    num_jobs: int
    to_enqueue: list[str]
    num_reused_done: int
    names: dict[str, str] = field(default_factory=dict)  # job id -> a name the batch lists it under


class Store(Lifecycle, Control, ApiFileStore, ApiBatchStore):
    """Data access over one database. Thread-safe: each call opens its own session.

    Job state changes, leases and workers are `schemas.sql.lifecycle.Lifecycle`'s part; ids by prefix, cancel and
    retry `schemas.sql.control.Control`'s; the HTTP API's keys, files and batch objects `schemas.sql.api_files` and
    `schemas.sql.api_batches`'. A worker's store waits
    out database outages for up to `retry_s` in the calls it makes while holding a job (0: fail at once)."""

    def __init__(self, url: str, blob_dir: Path | None = None, retry_s: float = 0) -> None:
        self.url = url
        self.retry_s = retry_s
        self.engine: Engine = make_engine(url)
        self._sessions = make_sessionmaker(self.engine)
        self.blob_dir = blob_dir

    def migrate(self) -> None:
        migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- documents -----------------------------------------------------------------------------
    def put_document(self, sha256: str, data: bytes, media_type: str) -> bool:
        """Store a document's bytes once (inline, or under `blob_dir`). Returns False if it was there."""
        return bool(self.put_documents([(sha256, data, media_type)]))

    def put_documents(self, documents: list[tuple[str, bytes, str]]) -> int:
        """Store many documents (sha256, bytes, media type) in one transaction, each once. Returns how many
        were new."""
        documents = list({sha: (sha, data, media) for sha, data, media in documents}.values())
        with self._sessions.begin() as session:
            known = set()
            for part in chunked([sha for sha, _, _ in documents]):
                known.update(session.scalars(select(Document.sha256).where(Document.sha256.in_(part))))
            rows = [self._document_row(sha, data, media) for sha, data, media in documents if sha not in known]
            if rows:  # executemany: one compiled statement for every row
                session.execute(dialect_insert(session, Document).on_conflict_do_nothing(index_elements=["sha256"]),
                                rows)
            return len(rows)

    def _document_row(self, sha256: str, data: bytes, media_type: str) -> dict[str, Any]:
        blob_uri = None
        if self.blob_dir is not None:
            path = self.blob_dir / sha256[:2] / sha256
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(path)
            blob_uri = path.resolve().as_uri()
        return dict(sha256=sha256, size_bytes=len(data), media_type=media_type,
                    content=None if blob_uri else data, blob_uri=blob_uri, created_at=utcnow())

    def read_document(self, sha256: str) -> tuple[bytes, str]:
        """A document's bytes and media type, wherever they are kept."""
        with self._sessions() as session:
            row = session.execute(select(Document.content, Document.blob_uri, Document.media_type)
                                  .where(Document.sha256 == sha256)).one()
        if row.blob_uri:
            return Path(row.blob_uri.removeprefix("file://")).read_bytes(), row.media_type
        return bytes(row.content), row.media_type

    def save_pages(self, sha256: str, pages: list[StoredPage]) -> None:
        """Record a document's extracted pages (numbered from 1), replacing any earlier extraction."""
        with self._sessions.begin() as session:
            for page_no, page in enumerate(pages, start=1):
                session.merge(Page(document_sha256=sha256, page_no=page_no, text=page.text,
                                   source=page.source_column(), image_sha256=page.image_sha256))

    def load_pages(self, sha256: str) -> list[StoredPage] | None:
        """Extracted pages in page order, or None if the document was never extracted."""
        with self._sessions() as session:
            rows = session.execute(select(Page.text, Page.source, Page.image_sha256)
                                   .where(Page.document_sha256 == sha256).order_by(Page.page_no)).all()
        return [StoredPage.from_row(*row) for row in rows] or None

    def document_meta(self, sha256: str) -> dict[str, Any]:
        """What a prompt template may say of a document besides its text: media type and page count."""
        with self._sessions() as session:
            media_type = session.scalar(select(Document.media_type).where(Document.sha256 == sha256))
            num_pages = session.scalar(select(func.count()).select_from(Page).where(Page.document_sha256 == sha256))
        return {"media_type": media_type, "num_pages": num_pages, "sha256": sha256}

    # -- task definitions ----------------------------------------------------------------------
    def put_task(self, task_hash: str, name: str, definition: dict[str, Any]) -> None:
        """Keep a task definition under its hash (once: the hash covers all of it)."""
        with self._sessions.begin() as session:
            stmt = dialect_insert(session, TaskDef).values(
                hash=task_hash, name=name, definition=json.dumps(definition, ensure_ascii=False), created_at=utcnow())
            session.execute(stmt.on_conflict_do_nothing(index_elements=["hash"]))

    def get_task(self, task_hash: str) -> dict[str, Any]:
        with self._sessions() as session:
            definition = session.scalar(select(TaskDef.definition).where(TaskDef.hash == task_hash))
        if definition is None:
            raise KeyError(f"no task definition {task_hash}")
        return json.loads(definition)

    # -- batches -------------------------------------------------------------------------------
    def create_batch(self, task: str, params: dict[str, Any], model: str, items: Iterable[tuple[str, str]],
                     label: str | None = None, priority: int = 0,
                     rejects: Iterable[Reject] = (), task_hash: str | None = None,
                     key_by_name: bool = False, batch_id: str | None = None) -> NewBatch:
        """Make a batch over `items` (name, document sha256), reusing any job that already exists.

        Names are unique in a batch; several names with the same content share one job, unless
        `key_by_name` (the task's prompt uses the name): then the name is one of the job's params.
        Failed and cancelled jobs go back to `queued`; every queued job of the batch is returned for
        (re-)enqueueing. (Jobs a dead worker held come back by their leases, not here.) `batch_id` gives the
        batch its id (else a new one); it must not exist yet.
        """
        keys_by_name: dict[str, str] = {}
        new_jobs: dict[str, tuple[str, dict[str, Any]]] = {}  # key -> (sha, params)
        for name, sha in items:
            job_params = {**params, "filename": name} if key_by_name else params
            key = idempotency_key(sha, task, job_params, model)
            keys_by_name.setdefault(name, key)
            new_jobs.setdefault(key, (sha, job_params))
        now = utcnow()
        with self._sessions.begin() as session:
            insert_rows = [dict(id=new_id(), idempotency_key=key, document_sha256=sha, task=task,
                                params=job_params, model=model, state=JobState.QUEUED, priority=priority,
                                attempts=0, created_at=now, updated_at=now, sent_at=now)
                           for key, (sha, job_params) in new_jobs.items()]
            if insert_rows:  # executemany: one compiled statement for every row
                session.execute(dialect_insert(session, Job).on_conflict_do_nothing(index_elements=["idempotency_key"]),
                                insert_rows)
            jobs = {key: (job_id, state) for part in chunked(list(new_jobs)) for key, job_id, state in session.execute(
                select(Job.idempotency_key, Job.id, Job.state).where(Job.idempotency_key.in_(part)))}
            batch = Batch(task=task, task_hash=task_hash, model=model, label=label, priority=priority, created_at=now,
                          **({"id": batch_id} if batch_id else {}))
            session.add(batch)
            session.flush()
            session.execute(insert(BatchItem), [dict(batch_id=batch.id, job_id=jobs[key][0], name=name)
                                                for name, key in keys_by_name.items()])
            session.add_all(BatchReject(batch_id=batch.id, name=r.name, error_code=r.code.value, error_message=r.message)
                            for r in {r.name: r for r in rejects}.values())
            again = [job_id for job_id, state in jobs.values() if state in (JobState.FAILED, JobState.CANCELLED)]
            for part in chunked(again):
                self.transition(part, [JobState.FAILED, JobState.CANCELLED], JobState.QUEUED, session=session,
                                error_code=None, error_message=None, attempts=0, lost_runs=0, isolate=False,
                                finished_at=None, priority=priority, sent_at=now)
            ids = [job_id for job_id, _ in jobs.values()]
            states = dict(row for part in chunked(ids) for row in session.execute(
                select(Job.id, Job.state).where(Job.id.in_(part))))
            to_enqueue = [job_id for job_id, state in states.items() if state == JobState.QUEUED]
            reused = sum(state == JobState.DONE for state in states.values())
            names = {jobs[key][0]: name for name, key in keys_by_name.items()}
            return NewBatch(batch.id, len(jobs), to_enqueue, reused, names)

    @retried
    def get_job(self, job_id: str) -> Job | None:
        with self._sessions() as session:
            return session.get(Job, job_id)

    def describe_job(self, job_id: str) -> str:
        """How a log line names a job: its id and its document's name in the newest batch that lists it, e.g.
        `job 1a2b... (contracts/nda.pdf)`, or `job 9f8e... (part 3 of contracts/thesis.pdf)` for a chunk. Never
        raises: with the database away it is the id alone."""
        try:
            with self._sessions() as session:
                job = session.get(Job, job_id)
                document_id = job.parent_id or job.id if job else job_id
                name = session.scalar(select(BatchItem.name).join(Batch, Batch.id == BatchItem.batch_id)
                                      .where(BatchItem.job_id == document_id).order_by(Batch.created_at.desc())
                                      .limit(1))
        except SQLAlchemyError:
            return f"job {job_id}"
        if job is not None and job.parent_id is not None:
            level = f" (level {job.chunk_level})" if (job.chunk_level or 1) > 1 else ""
            name = f"part {(job.chunk_index or 0) + 1}{level} of {name or 'document ' + job.document_sha256[:12]}"
        return f"job {job_id} ({name})" if name else f"job {job_id}"

    def chunk_outputs(self, parent_id: str, level: int) -> list[dict[str, Any]]:
        """The results of a parent's chunks at `level` (as `finish` stored them), in chunk order."""
        with self._sessions() as session:
            return list(session.scalars(
                select(Result.data).join(Job, Job.id == Result.job_id)
                .where(Job.parent_id == parent_id, Job.chunk_level == level).order_by(Job.chunk_index)))

    # -- reading -------------------------------------------------------------------------------
    def latest_batch_ids(self, limit: int = 20) -> list[str]:
        with self._sessions() as session:
            return list(session.scalars(select(Batch.id).order_by(Batch.created_at.desc()).limit(limit)))

    def get_batch(self, batch_id: str) -> Batch | None:
        with self._sessions() as session:
            return session.get(Batch, batch_id)

    def batch_counts(self, batch_id: str) -> Counter[JobState]:
        """Number of the batch's documents in each state; paths rejected at submit count as failed."""
        with self._sessions() as session:
            rows = session.execute(select(Job.state, func.count()).join(BatchItem, BatchItem.job_id == Job.id)
                                   .where(BatchItem.batch_id == batch_id).group_by(Job.state)).all()
            rejected = session.scalar(select(func.count()).select_from(BatchReject)
                                      .where(BatchReject.batch_id == batch_id))
        counts = Counter({state: n for state, n in rows})
        counts[JobState.FAILED] += rejected
        return +counts

    def unit_counts(self, batch_id: str) -> tuple[int, int]:
        """(finished, total) units of work: documents plus the chunk jobs of long documents."""
        states = self.unit_states(batch_id)
        return sum(n for state, n in states.items() if state.is_terminal), sum(states.values())

    def unit_states(self, batch_id: str) -> Counter[JobState]:
        """The batch's units of work (its jobs plus the chunk jobs of its long documents) in each state; paths
        rejected at submit count as failed units."""
        in_batch = select(BatchItem.job_id).where(BatchItem.batch_id == batch_id)
        with self._sessions() as session:
            rows = session.execute(select(Job.state, func.count()).where(
                or_(Job.id.in_(in_batch), Job.parent_id.in_(in_batch))).group_by(Job.state)).all()
            rejected = session.scalar(select(func.count()).select_from(BatchReject)
                                      .where(BatchReject.batch_id == batch_id))
        counts = Counter({state: n for state, n in rows})
        counts[JobState.FAILED] += rejected
        return +counts

    def tokens_out(self, batch_id: str) -> int:
        """Tokens the batch's units generated, as recorded when each ended (done or failed)."""
        in_batch = select(BatchItem.job_id).where(BatchItem.batch_id == batch_id)
        with self._sessions() as session:
            return session.scalar(select(func.coalesce(func.sum(Job.tokens_out), 0)).where(
                or_(Job.id.in_(in_batch), Job.parent_id.in_(in_batch)))) or 0

    def batch_rejects(self, batch_id: str) -> list[BatchReject]:
        with self._sessions() as session:
            return list(session.scalars(select(BatchReject).where(BatchReject.batch_id == batch_id)
                                        .order_by(BatchReject.name)))

    def batch_rows(self, batch_id: str, after: str | None = None,
                   limit: int | None = None) -> list[tuple[BatchItem, Job, Result | None]]:
        """Every job of a batch with its submitted name and result, in name order (from past `after`, at most
        `limit`, for a batch read page by page)."""
        query = (select(BatchItem, Job, Result).join(Job, BatchItem.job_id == Job.id)
                 .outerjoin(Result, Result.job_id == Job.id).where(BatchItem.batch_id == batch_id))
        if after is not None:
            query = query.where(BatchItem.name > after)
        with self._sessions() as session:
            return [tuple(row) for row in session.execute(query.order_by(BatchItem.name).limit(limit))]
