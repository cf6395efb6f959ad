"""What a labelled source of batches (an inbox) has taken in, read from the record: its batches carry its
label, so the documents it took are the jobs those batches list. Read-only queries; `Store` writes.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from schemas.sql.models import Batch, BatchItem, Job
from schemas.states import JobState
from schemas.sql.store import Store

QUERY_CHUNK = 500  # documents per IN (...) list


def taken_documents(store: Store, label: str, sha256s: Iterable[str]) -> dict[str, JobState]:
    """Of the documents `sha256s`, those a batch labelled `label` lists, each with where its jobs stand:
    a state that has not ended if any of its jobs is still on its way, else failed if one failed, else done."""
    wanted = sorted(set(sha256s))
    states: dict[str, set[JobState]] = {}
    with Session(store.engine) as session:
        for start in range(0, len(wanted), QUERY_CHUNK):
            rows = session.execute(
                select(Job.document_sha256, Job.state).join(BatchItem, BatchItem.job_id == Job.id)
                .join(Batch, Batch.id == BatchItem.batch_id)
                .where(Batch.label == label, Job.document_sha256.in_(wanted[start:start + QUERY_CHUNK])).distinct())
            for sha, state in rows:
                states.setdefault(sha, set()).add(state)
    return {sha: _overall(found) for sha, found in states.items()}


def _overall(states: set[JobState]) -> JobState:
    for state in states:
        if not state.is_terminal:
            return state
    return JobState.FAILED if states & {JobState.FAILED, JobState.CANCELLED} else JobState.DONE


@dataclass(frozen=True)
class LabelSummary:
    num_batches: int
    num_files: int  # names listed by those batches
    last_batch_id: str | None
    last_batch_at: dt.datetime | None


def label_summary(store: Store, label: str) -> LabelSummary:
    """How many batches carry `label`, how many files they list, and the newest of them."""
    with Session(store.engine) as session:
        num_batches = session.scalar(select(func.count()).select_from(Batch).where(Batch.label == label))
        num_files = session.scalar(select(func.count()).select_from(BatchItem).join(Batch)
                                   .where(Batch.label == label))
        last = session.execute(select(Batch.id, Batch.created_at).where(Batch.label == label)
                               .order_by(Batch.created_at.desc()).limit(1)).first()
    return LabelSummary(num_batches, num_files, last.id if last else None, last.created_at if last else None)
