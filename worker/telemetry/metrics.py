"""A worker's job metrics: what its tasks did to their jobs, read back from the record after each task.

The tasks themselves know nothing of metrics. After a task ran (Celery's `task_postrun`, in whichever
process ran it: a prefork child or a thread), its job row says how it ended: a job this worker ended
during the task is counted as done, or as failed under its reason code; an infer job adds its queue wait,
run time, batch size and tokens. The values are kept in prometheus-client's multiprocess files, so the
worker's exporter sums its prefork children too (`worker.telemetry.exporter` sets that up before this module
is imported).
"""
from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from celery.signals import task_postrun, task_prerun
from prometheus_client import Counter, Histogram

from schemas.messages import INFER_TASK, PREPARE_TASK
from schemas.sql.models import Job
from schemas.states import JobState
from worker.service import runtime

STAGES = {PREPARE_TASK: "prepare", INFER_TASK: "infer"}

JOBS_DONE = Counter("docbatch_jobs_done", "jobs this worker finished", ["stage"])
JOBS_FAILED = Counter("docbatch_jobs_failed", "jobs this worker failed, by reason code", ["stage", "reason"])
JOBS_PREPARED = Counter("docbatch_jobs_prepared", "jobs this worker made ready for inference")
QUEUE_WAIT = Histogram("docbatch_job_queue_wait_seconds", "from queued (prepare) or ready (infer) to started",
                       ["stage"], buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))
RUN_TIME = Histogram("docbatch_job_run_seconds", "time a job's task ran", ["stage"],
                     buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600))
BATCH_SIZE = Histogram("docbatch_job_batch_size", "rows in the engine batch a finished job ran in",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
TOKENS_IN = Counter("docbatch_job_tokens_in", "prompt tokens of the jobs this worker finished")
TOKENS_OUT = Counter("docbatch_job_tokens_out", "answer tokens of the jobs this worker finished")


@dataclass(frozen=True)
class JobOutcome:
    """How one task left its job, as far as this worker is concerned."""

    stage: str
    outcome: str  # done, failed, prepared, or none (a duplicate message, or the job moved on elsewhere)
    reason: str | None
    queue_wait_s: float | None
    run_s: float


def job_outcome(job: Job | None, stage: str, worker_name: str, task_started: float, task_ended: float) -> JobOutcome:
    """Classify what the task that ran from `task_started` to `task_ended` (epoch seconds) did to `job`.

    A job counts as done or failed where this worker ended it during the task; as prepared where the task
    made it ready (by then an infer worker may own it already)."""
    run_s = task_ended - task_started
    if job is None:
        return JobOutcome(stage, "none", None, None, run_s)
    ended_here = job.worker == worker_name and _during(job.finished_at, task_started)
    if job.state in (JobState.DONE, JobState.FAILED) and ended_here:
        outcome = job.state.value
    elif stage == "prepare" and _during(job.prepared_at, task_started):
        outcome = "prepared"
    else:
        return JobOutcome(stage, "none", None, None, run_s)  # a duplicate message, or the job moved on elsewhere
    if stage == "infer" and job.started_at is not None:
        queue_wait_s = _epoch(job.started_at) - _epoch(job.prepared_at or job.created_at)
        run_s = _epoch(job.finished_at) - _epoch(job.started_at)
    else:
        queue_wait_s = task_started - _epoch(job.created_at)
    return JobOutcome(stage, outcome, job.error_code if outcome == "failed" else None, max(queue_wait_s, 0.0), run_s)


def _during(moment: dt.datetime | None, task_started: float) -> bool:
    """Whether `moment` (written by this process's task, if by it) falls after the task started."""
    return moment is not None and _epoch(moment) >= task_started


def record(outcome: JobOutcome, job: Job | None) -> None:
    """Count one outcome in this process's metrics."""
    if outcome.outcome == "none":
        return
    if outcome.outcome == "done":
        JOBS_DONE.labels(outcome.stage).inc()
    elif outcome.outcome == "failed":
        JOBS_FAILED.labels(outcome.stage, outcome.reason or "unknown").inc()
    else:
        JOBS_PREPARED.inc()
    if outcome.queue_wait_s is not None:
        QUEUE_WAIT.labels(outcome.stage).observe(outcome.queue_wait_s)
    RUN_TIME.labels(outcome.stage).observe(outcome.run_s)
    if outcome.outcome == "done" and job is not None and job.batch_size:
        BATCH_SIZE.observe(job.batch_size)
    if outcome.outcome == "done" and job is not None:
        TOKENS_IN.inc(job.tokens_in or 0)
        TOKENS_OUT.inc(job.tokens_out or 0)


def _epoch(moment: dt.datetime) -> float:
    """SQLite hands back naive datetimes; they were written in UTC."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp()


_task_started: dict[str, float] = {}


def _on_prerun(task_id: str, task, **_) -> None:
    if task.name in STAGES:
        _task_started[task_id] = time.time()


def _on_postrun(task_id: str, task, args=(), **_) -> None:
    started = _task_started.pop(task_id, None)
    if started is None or not args:
        return
    rt = runtime.current()
    job = rt.store.get_job(args[0])
    record(job_outcome(job, STAGES[task.name], rt.worker_name, started, time.time()), job)


def observe_tasks() -> None:
    """Count every docbatch task this process (and its prefork children) runs from now on."""
    for stage in STAGES.values():  # every series shows from the start, at 0, so that rate() has a first point
        JOBS_DONE.labels(stage)
        QUEUE_WAIT.labels(stage)
        RUN_TIME.labels(stage)
    task_prerun.connect(_on_prerun, weak=False)
    task_postrun.connect(_on_postrun, weak=False)
