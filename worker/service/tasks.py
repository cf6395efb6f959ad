"""The two Celery tasks: each runs one stage of the pipeline (`worker.stages`) on a job it claims in
SQL, inside `worker.service.middleware` (claim, lease, failure to reason code).

prepare (CPU pool):  queued -> preparing -> ready: pages extracted (OCR for text-only models), stored;
                     a document too long for one request becomes chunk jobs (map) and waits on them.
infer (GPU thread):  ready -> running -> done, via the in-process engine that batches across threads;
                     the answer is decoded under the task's JSON schema, validated, checked and stored;
                     the last chunk of a level moves its document on (reduce).
A job whose worker died while it ran beside others runs alone next (`worker.service.lane`), so that a death
is counted only against the job that ran alone in it. `docbatch cancel` reaches the jobs a worker holds through
the control command `docbatch_cancel` (and, should the broadcast miss it, through the keeper at its next lease
renewal).
"""
from __future__ import annotations

import logging
from typing import Callable

from celery import shared_task
from celery.worker.control import control_command

from schemas.messages import CANCEL_COMMAND, INFER_TASK, PREPARE_TASK
from schemas.sql.models import Job
from schemas.states import JobState
from worker.service import failpoints, runtime
from worker.service.middleware import fail_on_error, held
from worker.service.runtime import Runtime
from worker.stages.answering import answer_and_finish
from worker.stages.extraction import prepare_job
from worker.stages.prompting import build_request

log = logging.getLogger(__name__)


@shared_task(name=PREPARE_TASK)
def prepare(job_id: str, name: str | None = None) -> None:
    """`name` is the document's name in its batch, carried for Flower and the logs only."""
    rt = runtime.current()
    with held(rt, job_id, JobState.QUEUED, JobState.PREPARING) as job:
        if job is not None:
            failpoints.hit("prepare_claimed", rt.settings, _document(rt, job))
            fail_on_error(rt, job, lambda: prepare_job(rt, job, name))


@shared_task(name=INFER_TASK)
def infer(job_id: str, name: str | None = None) -> None:
    """`name` is the document's name in its batch, carried for Flower and the logs only."""
    rt = runtime.current()
    while (seen := rt.store.get_job(job_id)) is not None and seen.state == JobState.READY:
        if seen.isolate:
            log.warning("%s runs alone: this worker finishes the jobs it runs, then runs it with none beside it",
                        rt.store.describe_job(job_id))
        # The lane holds the job until it may run (alone, or beside the others) and for as long as it runs; the
        # claim checks that the job still runs as the lane let it in.
        with rt.held.delivered(job_id), rt.lane.run(alone=seen.isolate), held(
                rt, job_id, JobState.READY, JobState.RUNNING, count_attempt=True, isolate=seen.isolate) as job:
            if job is not None:
                failpoints.hit("infer_claimed", rt.settings, _document(rt, job))
                request = fail_on_error(rt, job, lambda: build_request(rt, job))
                if request is not None:
                    fail_on_error(rt, job, lambda: answer_and_finish(rt, job, request))
                return
        # not claimed: it moved on (taken, cancelled), or its holder died since it was read: read it again


@control_command(name=CANCEL_COMMAND, args=[("job_ids", list), ("now", bool)], signature="<job_id>... [now]")
def cancel_held(state, job_ids: list[str] = (), now: bool = False) -> dict[str, str]:
    """Stop the jobs this worker holds among `job_ids`, as `docbatch cancel` asked: a job whose request the engine
    has not started (or with `now`, any) ends cancelled. Replies job id -> "cancelled" or "finishing"."""
    return runtime.current().stop_jobs({job_id: bool(now) for job_id in job_ids})


def _document(rt: Runtime, job: Job) -> Callable[[], bytes]:
    return lambda: rt.store.read_document(job.document_sha256)[0]
