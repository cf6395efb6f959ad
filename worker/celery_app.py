"""The Celery application: Redis broker, JSON only, late acks, one message prefetched per slot."""
from __future__ import annotations

from celery import Celery

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
        task_default_queue=PREPARE_QUEUE,
        worker_send_task_events=True,  # Flower
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


def broker_priority(priority: int) -> int:
    """User priority 0..9 (9 runs first) to the Redis transport's 0..9 (0 runs first)."""
    return 9 - max(0, min(9, priority))
