"""Leases and the workers registry, on SQLite and PostgreSQL (cancel and retry: test_control.py)."""
from __future__ import annotations

import datetime as dt
import hashlib

from sqlalchemy import update

from schemas.sql.lifecycle import Holder
from schemas.sql.models import Job, utcnow
from schemas.states import ErrorCode, JobState

PREP = Holder("prepare@h", "prepare@h/10", 30)
GPU = Holder("gpu0@h", "gpu0@h/11", 30)
OTHER = Holder("gpu1@h", "gpu1@h/12", 30)


def _jobs(store, *names: str):
    items = []
    for name in names:
        data = name.encode()
        sha = hashlib.sha256(data).hexdigest()
        store.put_document(sha, data, "text/plain")
        items.append((name, sha))
    batch = store.create_batch("summarize", {}, "m", items)
    return batch.batch_id, [batch.to_enqueue[i] for i in range(len(names))]


def _running(store, job_id: str, holder: Holder = GPU) -> None:
    store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
    store.mark_ready(job_id, PREP)
    store.claim(job_id, JobState.READY, JobState.RUNNING, holder, count_attempt=True)


def _lapse(store, job_id: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))


def test_a_live_holders_jobs_are_renewed_and_a_dead_ones_come_back(store):
    # Given two running jobs held by two workers, and a third the first worker's task let go of
    _, (alive, dead, dropped) = _jobs(store, "alive", "dead", "dropped")
    _running(store, alive, GPU)
    _running(store, dead, OTHER)
    _running(store, dropped, GPU)
    for job_id in (alive, dead, dropped):
        _lapse(store, job_id)
    # When the live worker renews the leases of the jobs it works on, and a sweep expires the rest
    assert store.heartbeat(GPU, [alive]) == 1
    moved = {job.id: lost for job, lost in store.expire_leases(max_attempts=3)}
    # Then the live worker keeps its job; the dead one's and the dropped one come back, ready to run again
    assert set(moved) == {dead, dropped}
    assert store.get_job(alive).state == JobState.RUNNING
    back = store.get_job(dead)
    assert (back.state, back.lost_runs, back.isolate, back.lease_owner) == (JobState.READY, 1, True, None)
    # And the holder that lost it can no longer record an outcome for it
    assert not store.finish(dead, {"text": "late"}, "late", tokens_in=1, tokens_out=1, batch_size=1, holder=OTHER)
    assert store.expire_leases(max_attempts=3) == []


def test_a_job_that_keeps_killing_its_worker_alone_fails_with_too_many_attempts(store):
    _, (job_id,) = _jobs(store, "poison")
    store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
    store.mark_ready(job_id, PREP)
    states = []
    for _ in range(5):
        store.claim(job_id, JobState.READY, JobState.RUNNING, GPU, count_attempt=True)
        _lapse(store, job_id)
        (_, lost), = store.expire_leases(max_attempts=3)
        job = store.get_job(job_id)
        states.append((job.state, job.isolate))
        if job.state == JobState.FAILED:
            break
    assert states == [(JobState.READY, True), (JobState.READY, True), (JobState.READY, True),
                      (JobState.FAILED, True)]
    job = store.get_job(job_id)
    assert job.error_code == ErrorCode.TOO_MANY_ATTEMPTS.value and "alone" in job.error_message


def test_a_claim_checks_the_isolation_it_was_prepared_for_and_tells_a_job_run_alone(store):
    # Given a ready job that its worker died beside (isolated now)
    _, (job_id,) = _jobs(store, "suspect")
    store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
    store.mark_ready(job_id, PREP)
    with store.engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(isolate=True, lost_runs=1))
    # When a task that read it before then claims it to run beside others, it gets nothing
    assert store.claim(job_id, JobState.READY, JobState.RUNNING, GPU, count_attempt=True, isolate=False) is None
    assert not store.ran_alone(GPU.owner)
    # And claimed to run alone, it is its holder's job run alone
    assert store.claim(job_id, JobState.READY, JobState.RUNNING, GPU, count_attempt=True, isolate=True) is not None
    assert store.ran_alone(GPU.owner) and not store.ran_alone(OTHER.owner)


def test_workers_register_and_show_what_they_hold(store):
    _, (a, b) = _jobs(store, "a", "b")
    store.register_worker(GPU, "infer")
    store.register_worker(PREP, "prepare")
    _running(store, a, GPU)
    _running(store, b, GPU)
    store.heartbeat(GPU, [a, b])
    rows = {worker.owner: held for worker, held in store.workers(seen_within_s=60)}
    assert rows == {GPU.owner: 2, PREP.owner: 0}
    store.worker_stopped(PREP)
    assert [worker.owner for worker, _ in store.workers(seen_within_s=60)] == [GPU.owner]


def test_jobs_waiting_for_a_message_are_counted_and_the_longest_waiting_come_first(store):
    _, ids = _jobs(store, "a", "b", "c")
    later = utcnow() + dt.timedelta(seconds=1)
    assert store.count_waiting_since(JobState.QUEUED, later) == 3
    assert store.count_waiting_since(JobState.QUEUED, utcnow() - dt.timedelta(minutes=1)) == 0
    store.claim(ids[0], JobState.QUEUED, JobState.PREPARING, PREP)
    assert store.count_waiting_since(JobState.QUEUED, later) == 2
    assert store.job_states([ids[0], ids[1], "nope"]) == {ids[0]: JobState.PREPARING, ids[1]: JobState.QUEUED}
    store.mark_sent([ids[1]])
    assert [job.id for job in store.waiting_since(JobState.QUEUED, later, 5)] == [ids[2], ids[1]]
    assert [job.id for job in store.waiting_since(JobState.QUEUED, later, 5, job_ids=[ids[1]])] == [ids[1]]


def test_an_extraction_killed_at_the_hard_time_limit_fails_with_extract_timeout(store, settings):
    from billiard.exceptions import TimeLimitExceeded
    from worker.service.middleware import fail_hard_timeout
    from worker.service.runtime import Runtime

    # Given a job a prepare child was extracting when Celery killed it at the hard time limit
    _, (job_id, other) = _jobs(store, "hangs", "other")
    store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
    rt = Runtime(settings.model_copy(update={"database_url": store.url}), "prepare@h")
    # When the parent hears of it (Celery's task_failure), then of an ordinary failure
    assert fail_hard_timeout(rt, job_id, TimeLimitExceeded(330))
    assert not fail_hard_timeout(rt, other, ValueError("not a time limit"))
    # Then the job failed with extract_timeout instead of coming back to hang again; the other is untouched
    job = store.get_job(job_id)
    assert (job.state, job.error_code) == (JobState.FAILED, "extract_timeout")
    assert store.get_job(other).state == JobState.QUEUED
