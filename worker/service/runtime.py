"""What a worker process builds once at start and hands to every task it runs."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from schemas.sql.lifecycle import Holder
from schemas.settings import Settings
from schemas.states import DocbatchError, ErrorCode
from schemas.sql.store import Store
from schemas.tasks import TaskDefinition
from worker.documents.extract import ExtractLimits
from worker.service.keeper import HeldJobs
from worker.service.lane import Lane
from worker.models.info import ModelInfo, input_budget, model_info

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    worker_name: str
    engine: Any = None  # worker.engine.Engine on infer workers
    tokenizer: Any = None
    processor: Any = None  # vision models only
    loaded_info: ModelInfo | None = None  # infer workers: from the loaded model
    app: Any = None  # the Celery app this process sends messages through
    lane: Lane = field(default_factory=Lane)  # infer workers: where jobs start (isolation after crashes)
    held: HeldJobs = field(default_factory=HeldJobs)  # the jobs this process works on: their leases are renewed
    _stores: dict[int, Store] = field(default_factory=dict)
    _tasks: dict[str, TaskDefinition] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        """One store per process: prefork children must not share the parent's database connections. It
        waits out database outages for up to `db_retry_s` in the calls a job's task makes."""
        pid = os.getpid()
        if pid not in self._stores:
            self._stores[pid] = Store(self.settings.effective_database_url, self.settings.blob_dir,
                                      retry_s=self.settings.db_retry_s)
        return self._stores[pid]

    @property
    def holder(self) -> Holder:
        """This process as the holder of the jobs it claims (each prefork child is a holder of its own)."""
        return Holder.this_process(self.worker_name, self.settings.lease_s)

    def task(self, task_hash: str | None) -> TaskDefinition:
        """A job's task definition (read once: a hash names one definition forever)."""
        if task_hash is None:
            raise DocbatchError(ErrorCode.INTERNAL_ERROR, "the job has no task definition (made by an older "
                                                          "docbatch); submit its document again")
        if task_hash not in self._tasks:
            self._tasks[task_hash] = TaskDefinition.model_validate(self.store.get_task(task_hash))
        return self._tasks[task_hash]

    def stop_jobs(self, stops: dict[str, bool]) -> dict[str, str]:
        """Stop the held jobs `cancel` asked to (job id -> now): each one this process holds, with what becomes
        of it (`schemas.messages.CANCELLED` or `FINISHING`, see `HeldJobs.stop`). A job stopped here is cancelled
        in the store before the answer goes back, so a second `cancel` right after this one finds it ended, not
        running (its task, waking later, finds it cancelled already)."""
        if self.engine is None:  # a prepare process: `cancel` ends the jobs it extracts in SQL at once
            return {}
        outcomes = {}
        for job_id, now in stops.items():
            stopped = self.held.stop(job_id, now, self.engine.abort)
            if stopped is None:
                continue
            outcomes[job_id], why = stopped
            if why is not None and self.store.cancel_held(job_id, self.holder, why):
                log.info("%s %s", self.store.describe_job(job_id), why)
        return outcomes

    @property
    def info(self) -> ModelInfo:
        """The model's kind, context and tokenizer: from the loaded model, or read once (prepare)."""
        return self.loaded_info or model_info(self.settings)

    @property
    def max_input_tokens(self) -> int:
        return input_budget(self.settings, self.info.context_tokens)

    @property
    def limits(self) -> ExtractLimits:
        s = self.settings
        return ExtractLimits(max_image_pixels=s.max_image_pixels, max_image_side=s.max_image_side,
                             render_dpi=s.render_dpi, max_pages=s.max_pages, max_stream_bytes=s.max_stream_bytes)


_current: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _current
    _current = runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError("no worker runtime installed: tasks run only inside `docbatch worker`")
    return _current
