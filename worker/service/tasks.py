"""The two Celery tasks: each runs one stage of the pipeline (`worker.stages`) on a job it claims in
SQL, inside `worker.service.middleware` (claim, lease, failure to reason code).

prepare (CPU pool):  queued -> preparing -> ready: pages extracted (OCR for text-only models), stored;
                     a document too long for one request becomes chunk jobs (map) and waits on them.
infer (GPU thread):  ready -> running -> done, via the in-process engine that batches across threads;
                     the answer is decoded under the task's JSON schema, validated, checked and stored;
                     the last chunk of a level moves its document on (reduce).
A job that keeps its worker from surviving is started alone (`worker.service.lane`) before anything is
counted against it. `docbatch cancel` reaches the jobs a worker holds through the control command
`docbatch_cancel` (and, should the broadcast miss it, through the keeper at its next lease renewal).
"""
from __future__ import annotations

import contextlib
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
    seen = rt.store.get_job(job_id)
    if seen is None or seen.state != JobState.READY:
        return
    with contextlib.ExitStack() as holding:
        with rt.lane.start(alone=seen.isolate):  # claim and prompt: where a hostile document kills its worker
            job = holding.enter_context(held(rt, job_id, JobState.READY, JobState.RUNNING, count_attempt=True))
            if job is None:
                return
            failpoints.hit("infer_claimed", rt.settings, _document(rt, job))
            request = fail_on_error(rt, job, lambda: build_request(rt, job))
        if request is not None:
            if job.isolate:
                rt.store.pass_isolation(job_id, rt.holder)
            fail_on_error(rt, job, lambda: answer_and_finish(rt, job, request))


@control_command(name=CANCEL_COMMAND, args=[("job_ids", list), ("now", bool)], signature="<job_id>... [now]")
def cancel_held(state, job_ids: list[str] = (), now: bool = False) -> dict[str, str]:
    """Stop the jobs this worker holds among `job_ids`, as `docbatch cancel` asked: a job whose request the engine
    has not started (or with `now`, any) ends cancelled. Replies job id -> "cancelled" or "finishing"."""
    return runtime.current().stop_jobs({job_id: bool(now) for job_id in job_ids})


def _document(rt: Runtime, job: Job) -> Callable[[], bytes]:
    return lambda: rt.store.read_document(job.document_sha256)[0]
