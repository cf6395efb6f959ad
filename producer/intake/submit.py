"""`docbatch submit`: store the inputs, make one batch of jobs for a task, enqueue the job ids.

Inputs are folders and files (every regular file a document) or an OpenAI Batch file (every request
line a document). Documents are content-addressed and jobs keyed by document, task definition and
model, so resubmitting makes no new jobs for work already done.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from producer.intake.openai_batch import store_request_file
from producer.intake.walk import walk
from schemas.messages import send_all
from schemas.settings import Settings
from schemas.states import ErrorCode
from schemas.sql.store import NewBatch, Reject, Store
from schemas.tasks import TaskDefinition
from worker.documents.extract import sniff


@dataclass(frozen=True)
class Collected:
    """Inputs stored as documents, ready to become a batch."""

    items: list[tuple[str, str]]  # (name in the batch, document sha256)
    rejects: list[Reject]
    num_inputs: int  # files found, or request lines
    num_new_documents: int
    skipped: list[Path] = field(default_factory=list)  # hidden files and folders passed over


@dataclass(frozen=True)
class Source:
    """What to submit: folders and files, or an OpenAI Batch input file."""

    paths: tuple[Path, ...] = ()
    openai_batch: Path | None = None

    def collect(self, settings: Settings, store: Store, console: Console) -> Collected:
        if self.openai_batch is not None:
            items, rejects, num_new = store_request_file(store, self.openai_batch)
            return Collected(items, rejects, len(items) + len(rejects), num_new)
        return _collect_files(settings, store, list(self.paths), console)


@dataclass(frozen=True)
class Submission:
    batch: NewBatch
    collected: Collected


class BrokerUnreachable(RuntimeError):
    """The batch is recorded in SQL but its jobs' messages could not be sent: they stay `queued`, and go out
    when the same inputs are submitted again, or when a worker's sweep finds them missing."""

    def __init__(self, submission: Submission, reason: str) -> None:
        super().__init__(reason)
        self.submission = submission
        self.reason = reason


def _collect_files(settings: Settings, store: Store, paths: list[Path], console: Console) -> Collected:
    found = walk(paths)
    rejects = list(found.rejects)
    items: list[tuple[str, str]] = []
    num_new = 0
    with Progress(TextColumn("storing documents"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        for doc in progress.track(found.found):
            if doc.size_bytes > settings.max_file_bytes:
                rejects.append(Reject(doc.name, ErrorCode.FILE_TOO_LARGE,
                                      f"{doc.size_bytes} bytes, over max_file_bytes ({settings.max_file_bytes})"))
                continue
            try:
                data = doc.path.read_bytes()
            except OSError as e:
                rejects.append(Reject(doc.name, ErrorCode.UNREADABLE, f"cannot read: {e.strerror}"))
                continue
            sha = hashlib.sha256(data).hexdigest()
            num_new += store.put_document(sha, data, sniff(data))
            items.append((doc.name, sha))
    return Collected(items, rejects, len(found.found), num_new, list(found.skipped))


def submit(settings: Settings, store: Store, app: Celery, source: Source, task: TaskDefinition, *,
           priority: int = 5, label: str | None = None, console: Console | None = None) -> Submission:
    """Store the inputs of `source`, record the task definition, make the batch, enqueue its unfinished jobs."""
    collected = source.collect(settings, store, console or Console(stderr=True))
    if source.openai_batch is not None and not collected.items:
        first = f"; the first: {collected.rejects[0].message}" if collected.rejects else ""
        raise ValueError(f"{source.openai_batch}: no request line docbatch can run "
                         f"({len(collected.rejects)} rejected{first})")
    store.put_task(task.hash, task.name, task.model_dump(mode="json"))
    batch = store.create_batch(task.name, {"task": task.hash}, settings.model, collected.items, label=label,
                               priority=priority, rejects=collected.rejects,
                               task_hash=task.hash, key_by_name=task.uses_filename)
    jobs = [(job_id, priority, batch.names.get(job_id)) for job_id in batch.to_enqueue]
    if send_all(app, store, jobs, settings.message_grace_s) < len(jobs):
        raise BrokerUnreachable(Submission(batch, collected), f"cannot reach Redis at {_safe(settings)}")
    return Submission(batch, collected)


def _safe(settings: Settings) -> str:
    """The broker's address without its password."""
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(settings.broker_url)
