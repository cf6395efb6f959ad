"""What the Redis broker holds for a queue, read the way kombu's Redis transport lays it out.

A queue is one list per priority (`infer`, `infer:1` ... `infer:9`, with docbatch's separator ":"); a
message delivered and not yet acknowledged sits in the hash `unacked` (delivery tag -> [message,
exchange, routing key]) with its delivery time in the sorted set `unacked_index`. The sweep compares
these counts with SQL to find jobs whose message was lost, without listing a long backlog.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import redis

from schemas.messages import PRIORITY_STEPS

UNACKED_HASH = "unacked"
UNACKED_INDEX = "unacked_index"


@dataclass(frozen=True)
class Delivered:
    job_id: str
    delivered_at: float  # Unix time


@dataclass(frozen=True)
class QueueState:
    """A queue's messages: waiting in its lists, and delivered but not acknowledged."""

    num_listed: int
    delivered: list[Delivered] = field(default_factory=list)

    @property
    def num_pending(self) -> int:
        return self.num_listed + len(self.delivered)


def queue_keys(queue: str, sep: str = ":") -> list[str]:
    """The Redis lists of `queue`, one per priority step (step 0 is the bare name)."""
    return [f"{queue}{sep}{step}" if step else queue for step in PRIORITY_STEPS]


def job_id_of(message: dict) -> str | None:
    """The job id a docbatch task message carries (its first positional argument), or None."""
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def read_queue(client: redis.Redis, queue: str) -> QueueState:
    """Count `queue`'s waiting messages and list its delivered, unacknowledged ones (a few hundred at most:
    what the workers have prefetched and are running)."""
    with client.pipeline(transaction=False) as pipe:
        for key in queue_keys(queue):
            pipe.llen(key)
        pipe.hgetall(UNACKED_HASH)
        pipe.zrange(UNACKED_INDEX, 0, -1, withscores=True)
        *lengths, unacked, index = pipe.execute()
    delivered_at = {tag.decode(): score for tag, score in index}
    delivered = []
    for tag, value in unacked.items():
        try:
            message, _exchange, routing_key = json.loads(value)
        except (TypeError, ValueError):
            continue
        job_id = job_id_of(message)
        if routing_key == queue and job_id:
            delivered.append(Delivered(job_id, delivered_at.get(tag.decode(), 0.0)))
    return QueueState(sum(lengths), delivered)
