"""The sweep: SQL is the record, Redis only the doorbell, so work whose process or message was lost is
found in SQL and sent again.

Every worker process sweeps every `sweep_interval_s` (`worker.service.keeper`); several processes and hosts may
sweep at once, since every action is a compare-and-set or an idempotent re-send (a duplicated message
finds its job taken and does nothing). Two kinds of loss:
- a held job whose lease expired (its process died): back to queued/ready and sent at once, or failed
  when it keeps killing its worker (`schemas.sql.lifecycle.after_lost_run`);
- a waiting job whose message is gone (Redis restarted without its data, or a message lost between
  delivery and acknowledgement): found by counting, per queue, the jobs SQL expects a message for against
  the messages Redis holds, so a long backlog is never listed nor flooded with duplicates; and a message
  delivered long ago whose job was never claimed (its consumer died holding it) is sent again.
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from collections import Counter

import redis

from schemas.broker_state import read_queue
from schemas.sql.lifecycle import LostRun
from schemas.messages import INFER_QUEUE, INFER_TASK, PREPARE_QUEUE, PREPARE_TASK, send
from schemas.sql.models import Job, utcnow
from schemas.settings import Settings
from schemas.states import ErrorCode, JobState
from schemas.sql.store import Store

log = logging.getLogger(__name__)
MAX_RESEND_PER_SWEEP = 1000  # a wiped Redis with a long backlog is refilled over several sweeps
QUEUES = ((JobState.QUEUED, PREPARE_QUEUE, PREPARE_TASK), (JobState.READY, INFER_QUEUE, INFER_TASK))


def sweep(store: Store, settings: Settings, app, client: redis.Redis) -> Counter[str]:
    """One sweep. Returns how many jobs it acted on, by action."""
    counts: Counter[str] = Counter()
    for job, lost in store.expire_leases(settings.max_attempts):
        counts[_take_back(store, app, job, lost)] += 1
    for state, queue, task_name in QUEUES:
        for job in _lost_messages(store, settings, client, state, queue):
            counts["resent"] += send(app, task_name, job.id, job.priority)
    if counts:
        log.warning("sweep: %s", dict(counts))
    return counts


def _take_back(store: Store, app, job: Job, lost: LostRun) -> str:
    if lost.state == JobState.FAILED:
        log.error("%s failed: %s", store.describe_job(job.id), lost.failed_message)
        if job.parent_id:
            store.fail(job.parent_id, ErrorCode.CHUNK_FAILED, f"chunk {job.chunk_index + 1} (level "
                       f"{job.chunk_level}) failed: {ErrorCode.TOO_MANY_ATTEMPTS.value}: {lost.failed_message}",
                       holder=None)
        return "quarantined"
    if lost.state == JobState.CANCELLED:
        log.info("%s: its holder %s died before it stopped as cancel asked; cancelled", store.describe_job(job.id),
                 job.lease_owner)
        return "cancelled"
    log.warning("%s: its holder %s stopped renewing its lease; %s again%s", store.describe_job(job.id),
                job.lease_owner, lost.state.value, " (it runs alone next)" if lost.isolate else "")
    send(app, PREPARE_TASK if lost.state == JobState.QUEUED else INFER_TASK, job.id, job.priority)
    return "lease_expired"


def _lost_messages(store: Store, settings: Settings, client: redis.Redis, state: JobState, queue: str) -> list[Job]:
    """Jobs waiting in `state` whose message is (probably) gone, marked sent again (so that the next sweeps
    leave them alone for `message_grace_s`); the caller sends them."""
    grace_s = settings.message_grace_s
    sent_before = utcnow() - dt.timedelta(seconds=grace_s)
    broker = read_queue(client, queue)
    states = store.job_states(d.job_id for d in broker.delivered)
    waiting = [d for d in broker.delivered if states.get(d.job_id) == state]  # delivered, not claimed yet
    # A consumer claims what it was delivered within moments; one that has not for message_grace_s died
    # holding it (Redis gives it back only after visibility_timeout_s): send it again, once a delivery (its
    # copy stays in `unacked` until then, and no consumer may come for the new one while the worker is down).
    stale: dict[str, float] = {}
    for d in waiting:
        if time.time() - d.delivered_at > grace_s:
            stale[d.job_id] = max(d.delivered_at, stale.get(d.job_id, 0.0))
    jobs = {job.id: job for job in store.waiting_since(state, sent_before, MAX_RESEND_PER_SWEEP, set(stale))
            if _unix(job.sent_at) < stale[job.id]} if stale else {}
    in_flight = broker.num_listed + len({d.job_id for d in waiting} - set(stale))
    missing = store.count_waiting_since(state, sent_before) - in_flight
    if missing > 0:
        for job in store.waiting_since(state, sent_before, min(missing, MAX_RESEND_PER_SWEEP)):
            jobs.setdefault(job.id, job)
    if jobs:
        store.mark_sent(list(jobs))
    return list(jobs.values())


def _unix(moment: dt.datetime | None) -> float:
    """A stored time as Unix time (the databases give it back without its UTC zone)."""
    if moment is None:
        return 0.0
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)).timestamp()
