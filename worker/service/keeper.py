"""A worker process's housekeeping thread: it registers the process, renews the leases of the jobs the
process works on (one statement every `lease_s / 3`), and sweeps for lost work (`worker.service.reconcile`) every
`sweep_interval_s`, so the sweep lives in every worker, never in one process that can vanish.

After a database outage the sweep waits until the database has answered for a whole `lease_s`: every
live holder has renewed its leases by then, so a lease that is still expired is truly abandoned.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import redis

from schemas.sql.lifecycle import Holder
from schemas.settings import Settings
from schemas.sql.store import Store

log = logging.getLogger(__name__)


class HeldJobs:
    """The jobs this process's tasks are working on: only these leases are renewed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: set[str] = set()

    def add(self, job_id: str) -> None:
        with self._lock:
            self._ids.add(job_id)

    def discard(self, job_id: str) -> None:
        with self._lock:
            self._ids.discard(job_id)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._ids)


class Keeper:
    def __init__(self, settings: Settings, store: Store, holder: Holder, held: HeldJobs, role: str, *,
                 sweeps: bool, app=None, register: bool = True) -> None:
        self.settings, self.store, self.holder, self.held, self.role = settings, store, holder, held, role
        self.sweeps, self.app, self.register = sweeps, app, register
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="docbatch-keeper", daemon=True)
        self._client: redis.Redis | None = None

    def start(self) -> "Keeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.register:
            _quietly(lambda: self.store.worker_stopped(self.holder), "unregister")

    def _loop(self) -> None:
        s = self.settings
        renew_every_s = s.lease_s / 3
        reachable_since: float | None = None
        next_sweep = 0.0
        registered = not self.register
        while not self._stop.wait(min(renew_every_s, s.sweep_interval_s)):
            try:
                if not registered:
                    self.store.register_worker(self.holder, self.role)
                    registered = True
                self.store.heartbeat(self.holder, self.held.ids())
                reachable_since = reachable_since or time.monotonic()
            except Exception as e:  # noqa: BLE001 - an outage is waited out; the thread must live on
                log.warning("cannot renew leases (%s); the database may be away", str(e).splitlines()[0])
                reachable_since = None
                continue
            now = time.monotonic()
            if self.sweeps and now >= next_sweep and now - reachable_since >= s.lease_s:
                next_sweep = now + s.sweep_interval_s
                _quietly(self._sweep, "sweep")

    def _sweep(self) -> None:
        from worker.service.reconcile import sweep

        if self._client is None:
            self._client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=10)
        sweep(self.store, self.settings, self.app, self._client)


def _quietly(action: Callable[[], object], what: str) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - retried next period
        log.exception("%s failed; trying again next period", what)
