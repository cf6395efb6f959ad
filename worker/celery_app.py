"""The Celery application: Redis broker, JSON only, late acks, one message prefetched per slot.

`celery -A worker.celery_app worker|flower|inspect|events ...` finds the module-level `app`, built from the
settings when first asked for, so every Celery tool speaks to Redis exactly as docbatch does. That matters
for more than the URL: docbatch's Redis transport separates the parts of a binding key with ":" (and names
its priority queues `infer:3`), Celery's default is "\\x06\\x16". A tool built on another app writes
bindings the workers cannot split (`ValueError: not enough values to unpack` in `celery.worker.pidbox` at
every poll), and counts the wrong queues.
"""
from __future__ import annotations

import functools

from celery import Celery
from kombu import Queue

from schemas.settings import Settings

PREPARE_QUEUE = "prepare"
INFER_QUEUE = "infer"
PREPARE_TASK = "docbatch.prepare"
INFER_TASK = "docbatch.infer"


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
            "visibility_timeout": settings.visibility_timeout_s,  # must outlast the longest job
            "priority_steps": list(range(10)),
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
    )
    return app


def display_name(name: str | None) -> dict[str, str]:
    """A task's keyword arguments: the document's name in its batch, which Flower and the worker's log show.
    The job id alone decides what a task does; the name is never read for that."""
    return {"name": name} if name else {}


def broker_priority(priority: int) -> int:
    """User priority 0..9 (9 runs first) to the Redis transport's 0..9 (0 runs first)."""
    return 9 - max(0, min(9, priority))


@functools.cache
def _module_app() -> Celery:
    import worker.telemetry  # noqa: F401 - registers `celery inspect docbatch_telemetry` with Celery's command line

    app = make_celery(Settings.load())
    app.conf.include = ["worker.tasks", "worker.standalone"]  # what a `celery -A worker.celery_app worker` runs
    return app


def __getattr__(name: str) -> Celery:
    """`app` (and `celery`): the module-level app Celery's `-A worker.celery_app` looks for, made on first use so
    that importing this module reads no settings."""
    if name in ("app", "celery"):
        return _module_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
