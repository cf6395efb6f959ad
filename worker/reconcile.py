"""The reconciler: SQL is the record, Redis only the doorbell, so work whose message or process was
lost is found in SQL and sent again (or failed, where running it again cannot help).

Every prepare process runs it every `reconcile_interval_s`. Several hosts may run it at once: each
action is a compare-and-set or an idempotent re-send, and a duplicated message does nothing.
"""
from __future__ import annotations

import logging
import threading

from schemas.settings import Settings
from schemas.states import ErrorCode, JobState
from schemas.store import Store

log = logging.getLogger(__name__)

# Beyond prepare_timeout_s Celery kills a stuck child; a job still `preparing` after this margin lost its process.
PREPARE_MARGIN_S = 60


def reconcile(store: Store, settings: Settings) -> dict[str, int]:
    """One sweep. Returns how many jobs it acted on, by action."""
    from worker.tasks import send_infer, send_prepare

    counts = {"failed_preparing": 0, "resent_prepare": 0, "resent_infer": 0}
    for job in store.stale_jobs(JobState.PREPARING, settings.prepare_timeout_s + PREPARE_MARGIN_S):
        if store.fail_stale(job.id, JobState.PREPARING, settings.prepare_timeout_s + PREPARE_MARGIN_S,
                            ErrorCode.EXTRACT_TIMEOUT, "extraction did not finish: its process was stopped "
                            f"after prepare_timeout_s ({settings.prepare_timeout_s} s) or died"):
            counts["failed_preparing"] += 1
    for job in store.stale_jobs(JobState.QUEUED, settings.job_timeout_s):
        store.touch(job.id, JobState.QUEUED)
        send_prepare(job.id, job.priority)
        counts["resent_prepare"] += 1
    for state in (JobState.READY, JobState.RUNNING):  # a stale running job may be claimed again
        for job in store.stale_jobs(state, settings.job_timeout_s):
            if state == JobState.READY:
                store.touch(job.id, state)
            send_infer(job.id, job.priority)
            counts["resent_infer"] += 1
    if any(counts.values()):
        log.warning("reconciler: %s", counts)
    return counts


def start_reconciler(settings: Settings) -> threading.Thread:
    """Sweep every `reconcile_interval_s` in a daemon thread of this process."""
    def loop() -> None:
        store = Store(settings.effective_database_url, settings.blob_dir)
        while True:
            try:
                reconcile(store, settings)
            except Exception:  # noqa: BLE001 - a failed sweep is retried next period
                log.exception("reconciler sweep failed")
            stop.wait(settings.reconcile_interval_s)

    stop = threading.Event()
    thread = threading.Thread(target=loop, name="docbatch-reconciler", daemon=True)
    thread.start()
    return thread
