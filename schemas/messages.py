"""The message contract between producers and workers: queues, task names, the Celery app both sides
build from the settings, and the one way to send a job's message.

A message carries a job id (and the document's name, for Flower and logs); SQL holds everything else.
Redis broker, JSON only, late acks, one message prefetched per slot. docbatch's Redis transport separates
the parts of a binding key with ":" (and names its priority queues `infer:3`); every Celery tool must use
this app (`celery -A worker.celery_app ...`), or it writes bindings the workers cannot split.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery
from kombu import Queue
from kombu.exceptions import OperationalError

from schemas.settings import Settings

log = logging.getLogger(__name__)
PREPARE_QUEUE = "prepare"
INFER_QUEUE = "infer"
PREPARE_TASK = "docbatch.prepare"
INFER_TASK = "docbatch.infer"
PRIORITY_STEPS = range(10)  # the Redis transport's priority lists: `infer`, `infer:1` ... `infer:9`
CANCEL_COMMAND = "docbatch_cancel"  # the workers' control command that stops held jobs (`announce_cancel`)
# What a worker answers for each held job it stops: it ends cancelled; its answer is being generated and may finish
CANCELLED, FINISHING = "cancelled", "finishing"


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings.broker_url`. Producers only send by task name; they never import tasks."""
    app = Celery("docbatch", broker=settings.broker_url, set_as_current=True)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,  # results live in SQL
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # A message unacknowledged this long is delivered again. Leases, not this, guard running jobs: a
            # duplicate of a job held by a live worker does nothing, so it can be short, and a message a
            # dead worker had prefetched comes back within minutes.
            "visibility_timeout": settings.visibility_timeout_s,
            "priority_steps": list(PRIORITY_STEPS),
            "sep": ":",
            "queue_order_strategy": "priority",
        },
        # Extraction of one file is bounded: the soft limit fails the job cleanly (extract_timeout), the
        # hard one replaces a child stuck in native code.
        task_annotations={PREPARE_TASK: {"soft_time_limit": settings.prepare_timeout_s,
                                         "time_limit": settings.prepare_timeout_s + 30}},
        task_routes={PREPARE_TASK: {"queue": PREPARE_QUEUE}, INFER_TASK: {"queue": INFER_QUEUE}},
        task_queues=[Queue(PREPARE_QUEUE), Queue(INFER_QUEUE)],  # both listed, so Flower shows both
        task_default_queue=PREPARE_QUEUE,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_max_retries=None,  # a Redis outage is waited out, never a reason to exit
    )
    return app


def display_name(name: str | None) -> dict[str, str]:
    """A task's keyword arguments: the document's name in its batch, which Flower and the worker's log show.
    The job id alone decides what a task does; the name is never read for that."""
    return {"name": name} if name else {}


def broker_priority(priority: int) -> int:
    """User priority 0..9 (9 runs first) to the Redis transport's 0..9 (0 runs first)."""
    return 9 - max(0, min(9, priority))




def announce_cancel(app: Celery, job_ids: list[str], now: bool, *, timeout_s: float = 5.0,
                    num_workers: int | None = None) -> dict[str, str] | None:
    """Tell the workers at once that `cancel` asked these running jobs to stop (the store says so already; a
    worker that misses this finds it there at its next lease renewal). Returns what the workers that answered
    within `timeout_s` did, job id -> `CANCELLED` or `FINISHING` (waiting for at most `num_workers` answers), or
    None when the broker cannot be reached."""
    try:
        replies = app.control.broadcast(CANCEL_COMMAND, arguments={"job_ids": job_ids, "now": now}, reply=True,
                                        timeout=timeout_s, limit=num_workers or None)
    except (OperationalError, OSError) as e:
        log.info("could not tell the workers of the cancel (%s); they find it at their next lease renewal", e)
        return None
    outcomes: dict[str, str] = {}
    for reply in replies or []:
        for answer in reply.values():
            if isinstance(answer, dict):
                outcomes.update({job_id: outcome for job_id, outcome in answer.items() if isinstance(outcome, str)})
    return outcomes


def send(app: Celery, task_name: str, job_id: str, priority: int, name: str | None = None) -> bool:
    """Send a job's message; False (logged) when the broker is unreachable. The job's state is already in
    SQL, so nothing is lost: the workers' sweep sends it again once the broker is back."""
    queue = PREPARE_QUEUE if task_name == PREPARE_TASK else INFER_QUEUE
    try:
        app.send_task(task_name, args=[job_id], kwargs=display_name(name), queue=queue,
                      priority=broker_priority(priority))
        return True
    except OperationalError as e:
        log.info("could not send job %s to %s (%s); the sweep sends it when the broker is back", job_id, queue, e)
        return False


def send_all(app: Celery, store: Any, jobs: list[tuple[str, int, str | None]], grace_s: float) -> int:
    """Send the prepare messages of `jobs` ((job id, priority, name), in order); the number sent, stopping at the
    first the broker refuses (the rest wait in SQL for the workers' sweep).

    A batch of tens of thousands takes minutes to send. The workers' sweep takes a queued job whose message went out
    over `grace_s` (the settings' message_grace_s) ago and is not in Redis for lost and sends it again; a job's
    `sent_at` is set when it is recorded, so the jobs this loop has not reached yet would look lost. So every third
    of `grace_s`, from the start, the jobs not sent yet are marked sent now (`store.mark_sent`)."""
    refreshed = -float("inf")
    for i, (job_id, priority, name) in enumerate(jobs):
        if time.monotonic() - refreshed >= grace_s / 3:
            store.mark_sent([job for job, _, _ in jobs[i:]])
            refreshed = time.monotonic()
        if not send(app, PREPARE_TASK, job_id, priority, name):
            return i
    return len(jobs)
