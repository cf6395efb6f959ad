"""The reconciler finds lost or stuck work in SQL: it re-sends lost messages and fails lost extractions."""
from __future__ import annotations

import datetime as dt
import hashlib

import redis
from sqlalchemy import update

from schemas.models import Job
from schemas.states import JobState
from schemas.store import Store
from worker.celery_app import make_celery
from worker.reconcile import reconcile

PARAMS = {"max_new_tokens": 8, "repetition_penalty": 1.1, "prompt_version": 3}


def _job_in(store: Store, state: JobState, text: str, hours_ago: float) -> str:
    data = text.encode()
    sha = hashlib.sha256(data).hexdigest()
    store.put_document(sha, data, "text/plain")
    job_id = store.create_batch("summarize", PARAMS, "m", [(f"{text}.txt", sha)]).to_enqueue[0]
    with store.engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(
            state=state, updated_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=hours_ago)))
    return job_id


def _messages(broker_url: str, queue: str) -> int:
    client = redis.Redis.from_url(broker_url)
    return sum(client.llen(key) for key in client.keys(f"{queue}*") if client.type(key) == b"list")


def test_lost_messages_are_sent_again_and_lost_extractions_fail(settings, tmp_path):
    # Given jobs stuck for two hours in each non-final state, and one that is merely busy
    settings = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'r.sqlite3'}",
                                           "job_timeout_s": 3600, "prepare_timeout_s": 300})
    store = Store(settings.effective_database_url)
    store.migrate()
    make_celery(settings)  # the app the re-sent messages go through
    preparing = _job_in(store, JobState.PREPARING, "preparing", hours_ago=2)
    queued = _job_in(store, JobState.QUEUED, "queued", hours_ago=2)
    ready = _job_in(store, JobState.READY, "ready", hours_ago=2)
    busy = _job_in(store, JobState.RUNNING, "busy", hours_ago=0)
    # When the reconciler sweeps
    counts = reconcile(store, settings)
    # Then the lost extraction failed with a reason, and the lost messages were sent again
    assert counts == {"failed_preparing": 1, "resent_prepare": 1, "resent_infer": 1}
    job = store.get_job(preparing)
    assert (job.state, job.error_code) == (JobState.FAILED, "extract_timeout")
    assert _messages(settings.broker_url, "prepare") == 1 and _messages(settings.broker_url, "infer") == 1
    assert store.get_job(queued).state == JobState.QUEUED and store.get_job(busy).state == JobState.RUNNING
    # And a second sweep right away does nothing more: the re-sent jobs were touched
    assert reconcile(store, settings) == {"failed_preparing": 0, "resent_prepare": 0, "resent_infer": 0}
    assert store.get_job(ready).state == JobState.READY
    store.close()
