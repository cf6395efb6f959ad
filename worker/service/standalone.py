"""`celery -A worker.celery_app worker -Q infer|prepare ...`: a worker started by Celery's own command line
gets the same runtime as one `docbatch worker` starts (model and engine, or the prepare stage; telemetry).

The queue decides the role; the pool is the caller's to choose, as `docbatch worker` chooses it:
  celery -A worker.celery_app worker -Q infer -P threads -c 64 -n gpu0@%h
  celery -A worker.celery_app worker -Q prepare -P prefork -c 2 -n prepare@%h
"""
from __future__ import annotations

import logging

from celery.signals import celeryd_init

from schemas.messages import INFER_QUEUE, PREPARE_QUEUE
from schemas.settings import Settings
from worker.service import runtime

log = logging.getLogger(__name__)


def role_for_queues(queues: list[str]) -> str:
    """`infer` or `prepare` for the queues a worker consumes; ValueError for anything else."""
    if sorted(queues) == [INFER_QUEUE]:
        return "infer"
    if sorted(queues) == [PREPARE_QUEUE]:
        return "prepare"
    raise ValueError(f"a docbatch worker consumes exactly one of the queues {INFER_QUEUE} and {PREPARE_QUEUE} "
                     f"(-Q {INFER_QUEUE} or -Q {PREPARE_QUEUE}), not {queues or 'none'}")


@celeryd_init.connect
def _configure(sender: str, options: dict, **_) -> None:
    try:
        runtime.current()
        return  # `docbatch worker` made this process's runtime already
    except RuntimeError:
        pass
    queues = options.get("queues") or []
    role = role_for_queues(queues.split(",") if isinstance(queues, str) else list(queues))
    if role == "infer" and options.get("pool") not in ("threads", None):
        log.warning("an infer worker needs the threads pool (-P threads) to batch its tasks on one engine")
    from worker.service.process import configure

    configure(Settings.load(), role, sender)
