"""The mend of kombu's Redis transport (`worker.service.redis_transport`): a consumer's broker connection closes
cleanly when Redis dies under its BRPOP. Real redis-server (one of the test's own, on a free port, which the test
kills), real kombu, the connection laid out as a Celery consumer's: the task queue on the default channel, the
remote-control mailbox on a channel of its own."""
from __future__ import annotations

import shutil
import socket

import pytest

from faults.harness import Redis
from schemas.messages import INFER_QUEUE, INFER_TASK, make_celery, send
from schemas.settings import Settings
from worker.service.redis_transport import mend_channel_close

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to start and kill")


@pytest.fixture
def redis_server(tmp_path):
    server = Redis(tmp_path / "redis")
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()


def test_a_consumer_connection_closes_when_redis_dies_under_its_brpop(redis_server, tmp_path):
    # Given a consumer's connection (docbatch's broker settings) holding one infer message unacknowledged, its
    # remote-control mailbox listening, and a BRPOP for the next message in flight
    mend_channel_close()
    app = make_celery(Settings(home=tmp_path, broker_url=redis_server.url))
    assert send(app, INFER_TASK, "held-job", priority=5)
    received = []
    connection = app.connection_for_read()
    tasks = app.amqp.TaskConsumer(connection, queues=[app.amqp.queues[INFER_QUEUE]],
                                  callbacks=[lambda body, message: received.append(message)])
    tasks.consume()
    app.control.mailbox.Node("infer@test", channel=connection.channel()).listen(callback=lambda *_: None)
    _drain_until_quiet(connection)
    channel = tasks.channel
    assert len(received) == 1 and channel._in_poll
    # When Redis dies, and the connection is collected and closed as Celery's consumer does on a connection loss
    redis_server.kill()
    connection.collect(socket_timeout=2)
    connection.close()
    # Then the close went through (kombu's own raised AttributeError "'NoneType' object has no attribute
    # 'hostname'", which stopped the worker) and left the channel closed, so nothing touches it again
    assert channel.closed and not channel._in_poll


def _drain_until_quiet(connection) -> None:
    """Take what the broker has (the message, the mailbox's subscription) until nothing comes for half a second:
    the consumer waits then on its BRPOP."""
    while True:
        try:
            connection.drain_events(timeout=0.5)
        except socket.timeout:
            return
