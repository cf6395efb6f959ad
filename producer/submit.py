"""`docbatch submit`: hash and store documents, make one batch and its jobs, enqueue the job ids."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from producer.walk import Skipped, walk
from schemas.settings import Settings
from schemas.store import NewBatch, Store
from worker.celery_app import PREPARE_QUEUE, PREPARE_TASK, broker_priority
from worker.prompts import TASKS, task_params


@dataclass(frozen=True)
class Submission:
    batch: NewBatch
    skipped: list[Skipped]
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
    found, skipped = walk(paths)
    items: list[tuple[str, str]] = []
    num_new = 0
    with Progress(TextColumn("storing documents"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as progress:
        for doc in progress.track(found):
            try:
                size = doc.path.stat().st_size
                if size > settings.max_file_bytes:
                    skipped.append(Skipped(doc.path, f"larger than max_file_bytes ({size} > {settings.max_file_bytes})"))
                    continue
                data = doc.path.read_bytes()
            except OSError as e:
                skipped.append(Skipped(doc.path, f"cannot read: {e.strerror}"))
                continue
            sha = hashlib.sha256(data).hexdigest()
            num_new += store.put_document(sha, data, doc.media_type)
            items.append((doc.name, sha))
    batch = store.create_batch(task, task_params(settings), settings.model, items, label=label,
                               priority=priority, stale_after_s=settings.job_timeout_s)
    for job_id in batch.to_enqueue:
        app.send_task(PREPARE_TASK, args=[job_id], queue=PREPARE_QUEUE, priority=broker_priority(priority))
    return Submission(batch, skipped, len(found), num_new)
