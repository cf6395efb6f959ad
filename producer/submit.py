"""`docbatch submit`: hash and store documents, make one batch and its jobs, enqueue the job ids."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from producer.walk import walk
from schemas.settings import Settings
from schemas.states import ErrorCode
from schemas.store import NewBatch, Reject, Store
from worker.celery_app import PREPARE_QUEUE, PREPARE_TASK, broker_priority
from worker.extract import sniff
from worker.prompts import TASKS, task_params


@dataclass(frozen=True)
class Submission:
    batch: NewBatch
    rejects: list[Reject]
    skipped: list[Path]
    num_files: int
    num_new_documents: int


def submit(settings: Settings, store: Store, app: Celery, paths: list[Path], task: str, *,
           priority: int = 5, label: str | None = None, console: Console | None = None) -> Submission:
    """Store every accepted file under `paths` and enqueue the batch's unfinished jobs.

    Documents are content-addressed, and jobs keyed by document, task, params and model, so
    resubmitting a folder makes no new jobs for work already done.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    console = console or Console(stderr=True)
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
    batch = store.create_batch(task, task_params(settings), settings.model, items, label=label,
                               priority=priority, stale_after_s=settings.job_timeout_s, rejects=rejects)
    for job_id in batch.to_enqueue:
        app.send_task(PREPARE_TASK, args=[job_id], queue=PREPARE_QUEUE, priority=broker_priority(priority))
    return Submission(batch, rejects, found.skipped, len(found.found), num_new)
