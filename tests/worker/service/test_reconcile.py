"""The sweep finds lost work in SQL: jobs whose holder died, and jobs whose message Redis lost, against this
machine's Redis and a SQLite file."""
from __future__ import annotations

import datetime as dt
import hashlib

import redis
from sqlalchemy import update

from schemas.broker_state import read_queue
from schemas.sql.lifecycle import Holder
from schemas.messages import INFER_QUEUE, PREPARE_QUEUE, PREPARE_TASK, make_celery, send, send_all
from schemas.sql.models import Job, utcnow
from schemas.states import JobState
from schemas.sql.store import Store
from worker.service.reconcile import sweep

PREP, DEAD = Holder("prepare@h", "prepare@h/1", 30), Holder("gpu0@h", "gpu0@h/2", 30)


def _setup(settings, tmp_path, count: int):
    settings = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'r.sqlite3'}",
                                           "message_grace_s": 0})
    store = Store(settings.effective_database_url)
    store.migrate()
    app = make_celery(settings)
    items = []
    for i in range(count):
        data = f"contract {i}".encode()
        sha = hashlib.sha256(data).hexdigest()
        store.put_document(sha, data, "text/plain")
        items.append((f"c{i}.txt", sha))
    batch = store.create_batch("summarize", {}, "m", items)
    return settings, store, app, redis.Redis.from_url(settings.broker_url), batch.to_enqueue


def test_a_dead_holders_job_is_sent_again_at_once(settings, tmp_path):
    # Given a job a dead worker held, whose lease has run out
    settings, store, app, client, (job_id,) = _setup(settings, tmp_path, 1)
    store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
    store.mark_ready(job_id, PREP)
    store.claim(job_id, JobState.READY, JobState.RUNNING, DEAD)
    with store.engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - dt.timedelta(seconds=1)))
    # When a worker sweeps
    counts = sweep(store, settings, app, client)
    # Then the job is ready again and its message is on the infer queue, once
    assert counts["lease_expired"] == 1 and store.get_job(job_id).state == JobState.READY
    assert read_queue(client, INFER_QUEUE).num_listed == 1
    assert sweep(store, settings, app, client)["lease_expired"] == 0


def test_lost_messages_are_sent_again_without_duplicating_the_ones_redis_still_has(settings, tmp_path):
    # Given 5 queued jobs whose messages went out, then Redis lost 3 of them
    settings, store, app, client, ids = _setup(settings, tmp_path, 5)
    for job_id in ids[:2]:
        send(app, PREPARE_TASK, job_id, 5)
    assert read_queue(client, PREPARE_QUEUE).num_listed == 2
    # When a worker sweeps
    counts = sweep(store, settings, app, client)
    # Then exactly the missing number is sent again, and a second sweep sends nothing more
    assert counts["resent"] == 3
    assert read_queue(client, PREPARE_QUEUE).num_listed == 5
    assert sweep(store, settings, app, client)["resent"] == 0


def test_a_batch_whose_messages_are_still_going_out_is_not_sent_twice(settings, tmp_path):
    # Given 5 queued jobs recorded a while before their messages go out (a batch of tens of thousands takes minutes)
    settings, store, app, client, ids = _setup(settings, tmp_path, 5)
    settings = settings.model_copy(update={"message_grace_s": 60})
    with store.engine.begin() as conn:
        conn.execute(update(Job).values(sent_at=utcnow() - dt.timedelta(minutes=5)))
    # When a worker sweeps after the producer has sent two of them
    swept: list[dict] = []

    class Producer:  # the Celery app, with a sweep coming in after its second message
        def send_task(self, *args, **kwargs):
            app.send_task(*args, **kwargs)
            if read_queue(client, PREPARE_QUEUE).num_listed == 2:
                swept.append(sweep(store, settings, app, client))

    assert send_all(Producer(), store, [(job_id, 5, None) for job_id in ids], settings.message_grace_s) == 5
    # Then the sweep took the three not sent yet for on their way, not lost: each job has one message
    assert swept[0]["resent"] == 0
    assert read_queue(client, PREPARE_QUEUE).num_listed == 5


def test_a_message_delivered_to_a_consumer_that_died_is_sent_again(settings, tmp_path):
    # Given a queued job whose message a consumer took (unacknowledged) and never claimed
    settings, store, app, client, (job_id,) = _setup(settings, tmp_path, 1)
    send(app, PREPARE_TASK, job_id, 5)
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        channel.qos.restore_at_shutdown = False  # as when the consumer is killed: nothing gives it back
        message = channel.basic_get(PREPARE_QUEUE, no_ack=False)
        assert message is not None
        state = read_queue(client, PREPARE_QUEUE)
        assert (state.num_listed, [d.job_id for d in state.delivered]) == (0, [job_id])
        # When a worker sweeps (message_grace_s is 0 here)
        counts = sweep(store, settings, app, client)
    # Then the job's message is on its queue again
    assert counts["resent"] == 1
    assert read_queue(client, PREPARE_QUEUE).num_listed == 1
    # and only once: later sweeps, while the dead consumer's copy waits out its visibility timeout and no
    # consumer takes the new one (the worker is down), send nothing more
    for _ in range(3):
        assert sweep(store, settings, app, client)["resent"] == 0
    state = read_queue(client, PREPARE_QUEUE)
    assert (state.num_listed, [d.job_id for d in state.delivered]) == (1, [job_id])


def test_a_document_waiting_on_its_chunks_behind_a_long_backlog_is_never_run_early(settings, tmp_path):
    # Given a long document whose chunks wait behind a backlog, far longer than any lease
    settings, store, app, client, (parent_id,) = _setup(settings, tmp_path, 1)
    store.claim(parent_id, JobState.QUEUED, JobState.PREPARING, PREP)
    chunk_ids, _ = store.create_chunks(parent_id, 1, [[{"text": f"part {i}"}] for i in range(3)], PREP)
    long_ago = utcnow() - dt.timedelta(days=1)
    with store.engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == parent_id).values(updated_at=long_ago))
        conn.execute(update(Job).where(Job.id.in_(chunk_ids)).values(sent_at=long_ago, updated_at=long_ago))
    for key in client.keys("*"):
        client.delete(key)  # and Redis lost the chunks' messages too
    # When workers sweep, again and again
    for _ in range(3):
        sweep(store, settings, app, client)
    # Then the chunks are sent again, and the document is left waiting for them: no message of its own,
    # and a stray one could not start it as a truncated whole
    parent = store.get_job(parent_id)
    assert parent.state == JobState.WAITING and parent.input_parts is None
    assert read_queue(client, INFER_QUEUE).num_listed == len(chunk_ids)
    assert store.claim(parent_id, JobState.READY, JobState.RUNNING, DEAD) is None
