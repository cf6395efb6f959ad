"""A mend of kombu's Redis transport (kombu 5.7.0, the newest release), so that a worker survives the loss of Redis.

When Redis goes away, Celery's consumer closes its broker connection twice: `Connection.collect()`, then
`Connection.close()`. The consumer's channel reads its pending BRPOP reply first thing in `Channel.close()` (added
by https://github.com/celery/kombu/pull/1733, so that a message popped while closing is not lost). With Redis gone
that read raises ConnectionError and the close stops before it marks the channel closed. `collect()` shrugs that
off; the remote-control channel's close fails too (it deletes the mailbox's binding in Redis), which ends the closing
of the transport's channels before the consumer's is tried again, and `collect()` drops the transport's `client`.
The second close then restores the consumer's unacknowledged messages, builds a connection pool from
`transport.client.hostname`, and raises
`AttributeError: 'NoneType' object has no attribute 'hostname'` (the failure of kombu issue
https://github.com/celery/kombu/issues/582, reached by a new path). Celery does not count an AttributeError as a
connection error: "Unrecoverable error", a warm shutdown, and the infer process's model loaded again.

It happens when the connection loss reaches the worker first through another socket (the remote-control pub/sub
one, which `docbatch cancel` needs) while a BRPOP is in flight. The mend: a BRPOP reply the connection can no longer
give is no reply, and the close goes on, as it does when the loss comes through the BRPOP itself. Applied once per
worker process (`worker.service.process.configure`).
"""
from __future__ import annotations

import functools
import logging
from queue import Empty

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)


def mend_channel_close() -> None:
    """Make kombu's Redis `Channel.close()` finish when the in-flight BRPOP's connection is gone (idempotent)."""
    close = kombu_redis.Channel.close
    if getattr(close, "docbatch_mended", False):
        return

    @functools.wraps(close)
    def close_even_without_redis(channel: kombu_redis.Channel) -> None:
        if channel._in_poll:
            try:
                channel._brpop_read()  # delivers a message that came in the meantime, as kombu's own close does
            except Empty:
                pass
            except channel.connection_errors as e:
                log.info("closing a Redis channel whose broker connection is gone (%s)", e)
        close(channel)  # the read has cleared _in_poll: kombu's close goes straight on to closing

    close_even_without_redis.docbatch_mended = True
    kombu_redis.Channel.close = close_even_without_redis
