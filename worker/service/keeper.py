"""A worker process's housekeeping thread: it registers the process, renews the leases of the jobs the
process works on (one statement every `lease_s / 3`), keeps their messages (and those of the jobs waiting in its
lane to be claimed) from being delivered again while it does, and passes on the stops `docbatch cancel` asked for
them; beside it, a thread of its own sweeps for lost work (`worker.service.reconcile`) every `sweep_interval_s`, so
the sweep lives in every worker, never in one process that can vanish.

After a database outage the sweep waits until the database has answered for a whole `lease_s`: every
live holder has renewed its leases by then, so a lease that is still expired is truly abandoned.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from typing import Callable, Iterator

import redis

from schemas.broker_state import UNACKED_HASH, UNACKED_INDEX, job_id_of
from schemas.messages import CANCELLED, FINISHING
from schemas.sql.lifecycle import Holder
from schemas.settings import Settings
from schemas.sql.store import Store
from worker.engine.request import RequestAborted

log = logging.getLogger(__name__)
NOT_STARTED = "cancelled before the engine started it"
ABORTED = "cancelled while its answer was being generated (cancel --now)"


class HeldJobs:
    """The jobs this process's tasks are working on (only these leases are renewed), the engine request each
    one waits on, and the stops `docbatch cancel` asked for them; and the jobs whose messages its tasks have, whose
    messages are kept delivered (a held job's, and one's that waits in `worker.service.lane` to be claimed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[str] = set()
        self._delivered: Counter[str] = Counter()  # a duplicated message may wait beside the first
        self._requests: dict[str, Future] = {}
        self._stops: dict[str, bool] = {}  # job id -> now (abort even a request being generated)

    def add(self, job_id: str) -> None:
        with self._lock:
            self._ids.add(job_id)

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._ids.discard(job_id)
            self._requests.pop(job_id, None)
            self._stops.pop(job_id, None)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)

    @contextlib.contextmanager
    def delivered(self, job_id: str) -> Iterator[None]:
        """A task has `job_id`'s message: it is kept from a second delivery while the block runs, while the job
        waits to be claimed as while it is held."""
        with self._lock:
            self._delivered[job_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._delivered -= Counter([job_id])

    def kept_ids(self) -> list[str]:
        """The jobs whose messages this process keeps from being delivered again."""
        with self._lock:
            return list(self._ids | set(self._delivered))

    def waiting_on(self, job_id: str, future: Future, abort: Callable[[Future], None]) -> None:
        """The held job's task waits on this engine request now; a stop asked before applies to it at once."""
        with self._lock:
            self._requests[job_id] = future
            now = self._stops.get(job_id)
        if now is not None:
            _stop(future, now, abort)

    def done_waiting(self, job_id: str) -> None:
        with self._lock:
            self._requests.pop(job_id, None)

    def stop(self, job_id: str, now: bool, abort: Callable[[Future], None]) -> tuple[str, str | None] | None:
        """Stop a held job: (`CANCELLED`, why) when this call stops it (its request not started by the engine, or
        not yet handed to it, or `now`), (`CANCELLED`, None) when it was stopped before (by the keeper or the
        broadcast of one cancel, or an earlier cancel), (`FINISHING`, None) when its answer is being generated (or
        was) and may finish; None when this process does not hold it. `why` is the job's message once cancelled.
        The stop stays asked until the job's task ends, so a later request of the same job (the repair at twice
        the room) is cancelled too."""
        with self._lock:
            if job_id not in self._ids:
                return None
            now = self._stops[job_id] = self._stops.get(job_id, False) or now
            future = self._requests.get(job_id)
        if future is not None and future.done():
            stopped = future.cancelled() or isinstance(future.exception(), RequestAborted)
            return (CANCELLED, None) if stopped else (FINISHING, None)
        if future is None:
            return CANCELLED, NOT_STARTED
        why = _stop(future, now, abort)
        return (CANCELLED, why) if why else (FINISHING, None)


def _stop(future: Future, now: bool, abort: Callable[[Future], None]) -> str | None:
    """Cancel the request if the engine has not started it, else abort it when `now`; why it stopped, or None
    when it goes on."""
    if future.cancel():
        return NOT_STARTED
    if now and not future.done():
        abort(future)
        return ABORTED
    return None


class Keeper:
    def __init__(self, settings: Settings, store: Store, holder: Holder, held: HeldJobs, role: str, *,
                 sweeps: bool, app=None, register: bool = True,
                 on_stop: Callable[[dict[str, bool]], object] | None = None) -> None:
        """`on_stop` gets the held jobs `cancel` told to stop (job id -> now), at each renewal: an infer
        process's `Runtime.stop_jobs`. The broadcast usually told it before; this catches what it missed.
        With `sweeps`, a second thread sweeps, so that a long pass (thousands of messages re-sent after a
        Redis loss, on a starved core) never delays the renewals that keep this process's leases alive."""
        self.settings, self.store, self.holder, self.held, self.role = settings, store, holder, held, role
        self.sweeps, self.app, self.register, self.on_stop = sweeps, app, register, on_stop
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name="docbatch-keeper", daemon=True)]
        if sweeps:
            self._threads.append(threading.Thread(target=self._sweep_loop, name="docbatch-sweeper", daemon=True))
        self._client: redis.Redis | None = None
        self._reachable_since: float | None = None  # since when the renewals reach the database, without a miss

    def start(self) -> "Keeper":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        if self.register:
            _quietly(lambda: self.store.worker_stopped(self.holder), "unregister")

    def _loop(self) -> None:
        s = self.settings
        registered = not self.register
        wait_s = 0.0  # registered at once, so that `docbatch workers` (and `cancel`) count this process from its start
        while not self._stop.wait(wait_s):
            wait_s = s.renew_every_s
            try:
                if not registered:
                    self.store.register_worker(self.holder, self.role)
                    registered = True
                held = self.held.ids()
                self.store.heartbeat(self.holder, held)
                stops = self.store.stop_requests(self.holder, held) if self.on_stop else {}
                self._reachable_since = self._reachable_since or time.monotonic()
            except Exception as e:  # noqa: BLE001 - an outage is waited out; the thread must live on
                log.warning("cannot renew leases (%s); the database may be away", str(e).splitlines()[0])
                self._reachable_since = None
                continue
            if stops:
                _quietly(lambda: self.on_stop(stops), "stopping cancelled jobs")
            self._keep_messages(self.held.kept_ids())

    def _sweep_loop(self) -> None:
        """A pass every `sweep_interval_s`, once the renewals have reached the database for a whole `lease_s`."""
        s = self.settings
        next_sweep = 0.0
        while not self._stop.wait(min(s.renew_every_s, s.sweep_interval_s)):
            now, since = time.monotonic(), self._reachable_since
            if since is not None and now - since >= s.lease_s and now >= next_sweep:
                next_sweep = now + s.sweep_interval_s
                _quietly(self._sweep, "sweep")

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=10)
        return self._client

    def _sweep(self) -> None:
        from worker.service.reconcile import sweep

        sweep(self.store, self.settings, self.app, self._redis())

    def _keep_messages(self, job_ids: list[str]) -> None:
        """Keep the messages of the held jobs from being delivered again while their leases live (a Redis
        outage is left to Celery, which reconnects; the message then comes back and does nothing)."""
        try:
            kept = keep_delivered(self._redis(), job_ids)
        except redis.RedisError as e:
            log.debug("cannot keep the held jobs' messages delivered (%s)", e)
            return
        if kept:
            log.debug("kept %d held jobs' messages delivered", kept)


def keep_delivered(client: redis.Redis, job_ids: list[str]) -> int:
    """Reset the delivery time of the unacknowledged messages of `job_ids` to now, so that Redis does not deliver
    them again after `visibility_timeout_s` (kombu's Redis transport restores a message whose time in
    `unacked_index` is older than that). A duplicate would do nothing, but Celery would log it as a task run.
    Returns how many messages were kept."""
    wanted = set(job_ids)
    if not wanted:
        return 0
    tags = []
    for tag, value in client.hgetall(UNACKED_HASH).items():
        try:
            message = json.loads(value)[0]
        except (TypeError, ValueError, IndexError):
            continue
        if job_id_of(message) in wanted:
            tags.append(tag)
    if tags:
        client.zadd(UNACKED_INDEX, {tag: time.time() for tag in tags}, xx=True)
    return len(tags)


def _quietly(action: Callable[[], object], what: str) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - retried next period
        log.exception("%s failed; trying again next period", what)
