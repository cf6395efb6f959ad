"""Pydantic models for what crosses a boundary: exported result records and batch status."""
from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel

from schemas.sql.models import BatchItem, BatchReject, Job, Result
from schemas.states import JobState


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    return round((end - start).total_seconds(), 3) if start and end else None


class JobRecord(BaseModel):
    """One line of `docbatch results`: a job of a batch, its outcome and how it ran."""

    job_id: str | None  # None for a path rejected at submit (never became a document)
    name: str
    sha256: str | None
    task: str
    model: str | None = None
    state: JobState
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    raw_text: str | None = None  # a failed job's answer, when the answer was the problem (schema_invalid)
    worker: str | None = None
    batch_size: int | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    attempts: int = 0
    num_chunks: int | None = None  # long documents: chunks of the last map or reduce level
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    queue_s: float | None = None
    run_s: float | None = None

    @classmethod
    def from_row(cls, item: BatchItem, job: Job, result: Result | None) -> "JobRecord":
        return cls(job_id=job.id, name=item.name, sha256=job.document_sha256, task=job.task, model=job.model,
                   state=job.state,
                   result=result.data if result and job.state == JobState.DONE else None,
                   error_code=job.error_code, error_message=job.error_message,
                   raw_text=result.raw_text if result and job.state == JobState.FAILED else None,
                   worker=job.worker, batch_size=job.batch_size,
                   tokens_in=job.tokens_in, tokens_out=job.tokens_out, attempts=job.attempts, num_chunks=job.num_chunks,
                   created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                   queue_s=_seconds(job.created_at, job.started_at), run_s=_seconds(job.started_at, job.finished_at))

    @classmethod
    def from_reject(cls, reject: BatchReject, task: str, model: str) -> "JobRecord":
        return cls(job_id=None, name=reject.name, sha256=None, task=task, model=model, state=JobState.FAILED,
                   error_code=reject.error_code, error_message=reject.error_message)


class BatchStatus(BaseModel):
    """Counts by state for one batch (`docbatch status --json`): `batch`, `total`, one key per state."""

    batch: str
    total: int
    queued: int = 0
    preparing: int = 0
    ready: int = 0
    running: int = 0
    waiting: int = 0  # long documents whose chunks run (counted as units by progress)
    done: int = 0
    failed: int = 0
    cancelled: int = 0

    @classmethod
    def from_counts(cls, batch_id: str, counts: dict[JobState, int]) -> "BatchStatus":
        return cls(batch=batch_id, total=sum(counts.values()), **{state.value: n for state, n in counts.items()})

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled

    @property
    def is_finished(self) -> bool:
        return self.finished == self.total
