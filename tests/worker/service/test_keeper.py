"""The keeper renews its process's leases beside a sweep of its own, and keeps the messages of the jobs its process
holds from being delivered again: Redis (kombu's transport) gives an unacknowledged message back to the queue once
it is `visibility_timeout_s` old, and a duplicate of a running job, though it does nothing, is logged as a second
run. Real Redis, real kombu: a message
is delivered and left unacknowledged, as a worker holding its job leaves it."""
from __future__ import annotations

import threading
import time

import redis
from services import wait_for

from schemas.broker_state import UNACKED_INDEX, queue_keys
from schemas.messages import INFER_QUEUE, INFER_TASK, make_celery, send
from schemas.settings import Settings
from schemas.sql.lifecycle import Holder
from schemas.sql.store import Store
from worker.service.keeper import HeldJobs, Keeper, keep_delivered


def test_a_held_jobs_message_is_not_delivered_again_and_one_nobody_holds_is(broker_url, tmp_path):
    # Given two infer messages delivered to a consumer and never acknowledged, a minute ago (past the 10 s
    # visibility timeout); the job of the first is held, the second's consumer died
    settings = Settings(home=tmp_path, broker_url=broker_url, visibility_timeout_s=10)
    app = make_celery(settings)
    for job_id in ("held-job", "orphan-job"):
        assert send(app, INFER_TASK, job_id, priority=5)
    client = redis.Redis.from_url(settings.broker_url)
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        delivered = [channel.basic_get(queue, no_ack=False) for queue in queue_keys(INFER_QUEUE) for _ in range(2)]
        assert len([message for message in delivered if message is not None]) == 2
        client.zadd(UNACKED_INDEX, {tag: time.time() - 60 for tag in client.zrange(UNACKED_INDEX, 0, -1)})
        # When the keeper of the process that holds the first job renews, then the transport looks for stale ones
        assert keep_delivered(client, ["held-job", "not-delivered-job"]) == 1
        channel.qos.restore_visible(num=100, interval=1)
        # Then only the orphan's message went back to the queue (to be delivered again); the held job's stays
        # with its consumer (until the connection closes: a consumer that goes gives its messages back)
        listed = [item for key in queue_keys(INFER_QUEUE) for item in client.lrange(key, 0, -1)]
        assert len(listed) == 1 and b"orphan-job" in listed[0]
        assert client.zcard(UNACKED_INDEX) == 1


def test_the_messages_of_jobs_waiting_in_the_lane_are_kept_as_the_held_ones_are():
    # Given a held job, and a job whose task waits to claim it (twice: a duplicated message waits beside it)
    held = HeldJobs()
    held.add("held-job")
    with held.delivered("waiting-job"):
        with held.delivered("waiting-job"):
            # Then the keeper keeps both messages, and renews only the held job's lease
            assert sorted(held.kept_ids()) == ["held-job", "waiting-job"] and held.ids() == ["held-job"]
        assert sorted(held.kept_ids()) == ["held-job", "waiting-job"]
    # And once its task is done with it, its message is nobody's
    assert held.kept_ids() == ["held-job"]


def test_a_sweep_that_hangs_holds_back_no_lease_renewal(broker_url, tmp_path):
    # Given a sweeping worker process's keeper whose sweep pass hangs (thousands of messages re-sent after a Redis
    # loss, on a starved core: 30 s passes were measured), holding one job
    settings = Settings(home=tmp_path, broker_url=broker_url, lease_s=1.5, sweep_interval_s=0.5)
    store = Store(settings.effective_database_url)
    store.migrate()
    holder = Holder.this_process("sweeper@test", settings.lease_s)
    held = HeldJobs()
    held.add("held-job")
    renewals, sweeping, release = [], threading.Event(), threading.Event()
    heartbeat = store.heartbeat
    store.heartbeat = lambda who, job_ids: (renewals.append(list(job_ids)), heartbeat(who, job_ids))[1]
    keeper = Keeper(settings, store, holder, held, "infer", sweeps=True)
    keeper._sweep = lambda: (sweeping.set(), release.wait(60))
    keeper.start()
    try:
        # When the sweep starts (once the database has answered for a whole lease) and does not come back
        assert sweeping.wait(30)
        renewed_before = len(renewals)
        # Then the held job's lease is renewed on, again and again, while the pass hangs
        wait_for(lambda: len(renewals) >= renewed_before + 3, "three renewals during the hanging sweep", timeout_s=30,
                 every_s=0.1)
        assert not release.is_set() and renewals[-1] == ["held-job"]
    finally:
        release.set()
        keeper.stop()
        store.close()
