"""The job state machine in the store: the one writer of `Job.state`, leases, and the workers registry.

Every state change goes through `Lifecycle.transition`, a compare-and-set checked against
`schemas.states.TRANSITIONS`. A worker process holds the jobs it works on under a lease (`Holder`) that
its keeper thread renews with one statement every few seconds; a job whose lease ran out (its process
died) goes back to be run again, and the process that lost it can no longer record an outcome for it.
"""
from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from schemas.sql.db import chunked, dialect_insert
from schemas.sql.models import Job, Result, Worker, new_id, utcnow
from schemas.states import TRANSITIONS, ErrorCode, JobState, StopRequest, check_transition

log = logging.getLogger(__name__)
T = TypeVar("T")
HELD = (JobState.PREPARING, JobState.RUNNING)


@dataclass(frozen=True)
class Holder:
    """A worker process as the holder of leases. `owner` is unique to one life of one process."""

    name: str  # the worker's Celery node name, e.g. gpu0@host
    owner: str  # name/pid
    lease_s: float

    @classmethod
    def this_process(cls, name: str, lease_s: float) -> "Holder":
        return cls(name, cls.owner_of(name, os.getpid()), lease_s)

    @staticmethod
    def owner_of(name: str, pid: int) -> str:
        return f"{name}/{pid}"

    def expiry(self) -> dt.datetime:
        return utcnow() + dt.timedelta(seconds=self.lease_s)


@dataclass(frozen=True)
class LostRun:
    """What becomes of a job whose holder died: back to `state` (to be sent again), or failed."""

    state: JobState
    lost_runs: int
    isolate: bool
    failed_message: str | None = None


def after_lost_run(state: JobState, lost_runs: int, isolate: bool, max_attempts: int, *,
                   stop_requested: bool = False) -> LostRun:
    """Crash attribution, pure. A job whose infer process died while it ran beside others is not blamed (any of them
    may have killed it), but it runs alone from then on (`isolate`; `worker.service.lane`: its process lets the jobs
    it runs finish, then runs it with nothing beside it), so it never costs, nor loses, another job's run again. A
    job lost while it ran alone is the one that killed its process: it fails once its losses exceed `max_attempts`
    (after at most `max_attempts` alone-runs). Extraction always runs one document per process, so a prepare job
    fails once its losses exceed `max_attempts`. A running job `cancel` had asked to stop (`stop_requested`) is
    cancelled instead of run again."""
    lost = lost_runs + 1
    if state == JobState.RUNNING and stop_requested:
        return LostRun(JobState.CANCELLED, lost, isolate)
    if state == JobState.PREPARING:
        if lost > max_attempts:
            return LostRun(JobState.FAILED, lost, isolate, f"its prepare process died {lost} times while it ran")
        return LostRun(JobState.QUEUED, lost, isolate)
    if isolate and lost > max_attempts:
        return LostRun(JobState.FAILED, lost, isolate, f"its worker died {lost} times while it ran, the last ones "
                                                       "while it ran alone")
    return LostRun(JobState.READY, lost, True)


def is_infrastructure_error(error: BaseException) -> bool:
    """The database is away or busy (connection refused or lost, SQLite locked): worth waiting out."""
    return isinstance(error, DBAPIError) and (error.connection_invalidated or type(error).__name__ in (
        "OperationalError", "InterfaceError"))


def retried(method: Callable[..., T]) -> Callable[..., T]:
    """Retry a store call through database outages, with backoff, for up to the store's `retry_s`
    (0: no retry, as for the command line). The decorated calls are safe to repeat."""
    @functools.wraps(method)
    def call(self: "Lifecycle", *args: Any, **kwargs: Any) -> T:
        deadline, delay_s = time.monotonic() + self.retry_s, 0.25
        while True:
            try:
                return method(self, *args, **kwargs)
            except DBAPIError as e:
                if not is_infrastructure_error(e) or time.monotonic() + delay_s > deadline:
                    raise
                log.warning("database unavailable in %s (%s); retrying in %.1f s", method.__name__,
                            str(e.orig).splitlines()[0] if e.orig else e, delay_s)
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)
    return call


class Lifecycle:
    """Job state changes, leases and worker registration; mixed into `schemas.sql.store.Store`."""

    _sessions: Any
    retry_s: float = 0

    # -- the one writer of `state` ---------------------------------------------------------------
    def transition(self, job_ids: Iterable[str], from_states: Iterable[JobState], to_state: JobState, *,
                   where: Iterable[Any] = (), session: Session | None = None, **values: Any) -> int:
        """Move the jobs still in one of `from_states` (and matching `where`) to `to_state`, setting `values`
        too, as one compare-and-set. Returns how many moved. Raises `IllegalTransition` for a move the
        table does not list."""
        from_states = frozenset(from_states)
        check_transition(from_states, to_state)
        ids = list(job_ids)
        if not ids:
            return 0
        stmt = (update(Job).where(Job.id.in_(ids), Job.state.in_(list(from_states)), *where)
                .values(state=to_state, updated_at=utcnow(), **values))
        if session is not None:
            return session.execute(stmt).rowcount
        with self._sessions.begin() as own:
            return own.execute(stmt).rowcount

    # -- a worker's side ---------------------------------------------------------------------------
    @retried
    def claim(self, job_id: str, from_state: JobState, to_state: JobState, holder: Holder,
              count_attempt: bool = False, isolate: bool | None = None) -> Job | None:
        """Take a job under `holder`'s lease if it is still in `from_state` (and, given `isolate`, still runs alone or
        not as the caller prepared for); None if it is not (another has it, or it moved on). Claiming again a job
        this holder already has returns it (a retried call)."""
        now = utcnow()
        values: dict[str, Any] = dict(worker=holder.name, lease_owner=holder.owner, lease_expires_at=holder.expiry())
        if count_attempt:
            values.update(attempts=Job.attempts + 1, started_at=now)
        where = [] if isolate is None else [Job.isolate == isolate]
        with self._sessions.begin() as session:
            job = session.get(Job, job_id) if self.transition([job_id], [from_state], to_state, session=session,
                                                              where=where, **values) else None
            if job is None:  # not moved: a retried call finds the job already its own
                job = session.scalar(select(Job).where(Job.id == job_id, Job.state == to_state,
                                                       Job.lease_owner == holder.owner))
            return job

    @retried
    def mark_ready(self, job_id: str, holder: Holder) -> bool:
        """Extraction done: the job waits for a GPU worker."""
        return bool(self.transition([job_id], [JobState.PREPARING], JobState.READY, where=[Job.lease_owner == holder.owner],
                                    prepared_at=utcnow(), sent_at=utcnow(), **_NO_LEASE))

    @retried
    def finish(self, job_id: str, data: dict[str, Any], raw_text: str, *, tokens_in: int | None,
               tokens_out: int | None, batch_size: int | None, holder: Holder | None) -> bool:
        """Record a result and mark the job done: a running job only while `holder` still holds it, a
        waiting document (its chunks' answers merged) with `holder` None. False if it moved meanwhile."""
        now = utcnow()
        with self._sessions.begin() as session:
            if holder is None:
                done = self.transition([job_id], [JobState.WAITING], JobState.DONE, session=session, finished_at=now)
            else:
                done = self.transition([job_id], [JobState.RUNNING], JobState.DONE, session=session,
                                       where=[Job.lease_owner == holder.owner], tokens_in=tokens_in,
                                       tokens_out=tokens_out, batch_size=batch_size, finished_at=now,
                                       error_code=None, error_message=None, **_NO_LEASE)
            if done:
                session.merge(Result(job_id=job_id, data=data, raw_text=raw_text, created_at=now))
            return bool(done)

    @retried
    def fail(self, job_id: str, code: ErrorCode, message: str, raw_text: str | None = None, *,
             holder: Holder | None, tokens_in: int | None = None, tokens_out: int | None = None) -> bool:
        """Mark a job failed with a reason: one `holder` holds, or (`holder` None) one that waits, for a
        message or on its chunks. The model's answer is kept when given, and the tokens it spent."""
        with self._sessions.begin() as session:
            if holder is None:
                states, where = (JobState.QUEUED, JobState.READY, JobState.WAITING), []
            else:
                states, where = HELD, [Job.lease_owner == holder.owner]
            states = [s for s in states if JobState.FAILED in TRANSITIONS[s]]
            failed = self.transition([job_id], states, JobState.FAILED, session=session, where=where,
                                     error_code=code.value, error_message=message[:4000], finished_at=utcnow(),
                                     tokens_in=tokens_in, tokens_out=tokens_out, **_NO_LEASE)
            if failed and raw_text is not None:
                session.merge(Result(job_id=job_id, data={}, raw_text=raw_text, created_at=utcnow()))
            return bool(failed)

    @retried
    def fail_abandoned(self, job_id: str, state: JobState, code: ErrorCode, message: str) -> bool:
        """Fail a job still in `state` whose holder is known to be dead (its worker saw it killed), whoever
        that holder was."""
        return bool(self.transition([job_id], [state], JobState.FAILED, error_code=code.value,
                                    error_message=message[:4000], finished_at=utcnow(), **_NO_LEASE))

    # -- long documents: chunk jobs under a document's job -------------------------------------------
    @retried
    def create_chunks(self, parent_id: str, level: int, inputs: list[list[dict[str, Any]]],
                      holder: Holder | None) -> tuple[list[str], bool]:
        """Make (or find again) the chunk jobs of `parent_id` at `level`, one per input; the parent waits
        (from preparing under `holder`, or from waiting for another level with `holder` None).

        Returns the chunk jobs still to run, and whether every chunk is already done (then the
        caller moves the parent on at once). Failed or cancelled chunks from an earlier try run again.
        """
        now = utcnow()
        from_states, where = ([JobState.PREPARING], [Job.lease_owner == holder.owner]) if holder else (
            [JobState.WAITING], [])
        with self._sessions.begin() as session:
            if not self.transition([parent_id], from_states, JobState.WAITING, session=session, where=where,
                                   chunk_level=level, num_chunks=len(inputs), chunks_done=0, input_parts=None,
                                   **_NO_LEASE):
                return [], False  # not ours any more (its lease ran out, or it was cancelled)
            parent = session.get(Job, parent_id)
            keys = [hashlib.sha256(f"{parent.idempotency_key}:L{level}:C{i}:{json.dumps(parts, sort_keys=True)}"
                                   .encode()).hexdigest() for i, parts in enumerate(inputs)]
            rows = [dict(id=new_id(), idempotency_key=key, document_sha256=parent.document_sha256, task=parent.task,
                         params=parent.params, model=parent.model, state=JobState.READY, priority=parent.priority,
                         attempts=0, created_at=now, updated_at=now, sent_at=now, parent_id=parent_id,
                         chunk_level=level, chunk_index=i, input_parts=parts)
                    for i, (key, parts) in enumerate(zip(keys, inputs))]
            session.execute(dialect_insert(session, Job).values(rows)
                            .on_conflict_do_nothing(index_elements=["idempotency_key"]))
            again = session.scalars(select(Job.id).where(Job.idempotency_key.in_(keys), Job.state.in_(
                [JobState.FAILED, JobState.CANCELLED]))).all()
            self.transition(again, [JobState.FAILED, JobState.CANCELLED], JobState.READY, session=session,
                            error_code=None, error_message=None, attempts=0, lost_runs=0, isolate=False, sent_at=now)
            states = dict(session.execute(select(Job.id, Job.state).where(Job.idempotency_key.in_(keys))
                                          .order_by(Job.chunk_index)).all())
            num_done = sum(state == JobState.DONE for state in states.values())
            session.execute(update(Job).where(Job.id == parent_id).values(chunks_done=num_done))
            return [job_id for job_id, state in states.items() if state == JobState.READY], num_done == len(states)

    @retried
    def chunk_finished(self, parent_id: str) -> bool:
        """Count one more finished chunk; True for the caller that finished the parent's last one."""
        with self._sessions.begin() as session:
            done, total = session.execute(
                update(Job).where(Job.id == parent_id).values(chunks_done=Job.chunks_done + 1, updated_at=utcnow())
                .returning(Job.chunks_done, Job.num_chunks)).one()
            return done == total

    @retried
    def set_reduce_input(self, parent_id: str, parts: list[dict[str, Any]]) -> bool:
        """Give a waiting document its final input (the chunk answers to combine) and make it ready."""
        return bool(self.transition([parent_id], [JobState.WAITING], JobState.READY, input_parts=parts,
                                    sent_at=utcnow()))

    # -- leases and the workers registry -------------------------------------------------------------
    @retried
    def register_worker(self, holder: Holder, role: str) -> None:
        now = utcnow()
        with self._sessions.begin() as session:
            session.merge(Worker(owner=holder.owner, name=holder.name, role=role, host=socket.gethostname(),
                                 pid=os.getpid(), started_at=now, heartbeat_at=now))

    def heartbeat(self, holder: Holder, job_ids: Iterable[str]) -> int:
        """Renew the leases of the jobs `holder` is working on (`job_ids`: a job whose task ended without an
        outcome is not renewed, so it comes back), and its registration. Returns the leases renewed."""
        ids = list(job_ids)
        with self._sessions.begin() as session:
            held = session.execute(update(Job).where(Job.lease_owner == holder.owner, Job.state.in_(HELD),
                                                     Job.id.in_(ids))
                                   .values(lease_expires_at=holder.expiry())).rowcount if ids else 0
            session.execute(update(Worker).where(Worker.owner == holder.owner).values(heartbeat_at=utcnow()))
            return held

    def ran_alone(self, owner: str) -> bool:
        """Whether the process `owner` holds a job it runs alone: a process that died so was killed by that job
        (`after_lost_run` charges the loss to it), asked while the dead process's leases still run."""
        with self._sessions() as session:
            return session.scalar(select(func.count()).select_from(Job).where(
                Job.lease_owner == owner, Job.state == JobState.RUNNING, Job.isolate.is_(True))) > 0

    def worker_stopped(self, holder: Holder) -> None:
        with self._sessions.begin() as session:
            session.execute(update(Worker).where(Worker.owner == holder.owner).values(stopped_at=utcnow()))

    def workers(self, seen_within_s: float) -> list[tuple[Worker, int]]:
        """Worker processes heard from within `seen_within_s` and not stopped, with the jobs each holds."""
        since = utcnow() - dt.timedelta(seconds=seen_within_s)
        held = (select(Job.lease_owner, func.count().label("n")).where(Job.state.in_(HELD))
                .group_by(Job.lease_owner).subquery())
        with self._sessions() as session:
            rows = session.execute(select(Worker, func.coalesce(held.c.n, 0))
                                   .outerjoin(held, held.c.lease_owner == Worker.owner)
                                   .where(Worker.heartbeat_at >= since, Worker.stopped_at.is_(None))
                                   .order_by(Worker.name, Worker.pid)).all()
        return [(worker, n) for worker, n in rows]

    def expire_leases(self, max_attempts: int, limit: int = 1000) -> list[tuple[Job, LostRun]]:
        """Take back every held job whose lease ran out (its process died): queued or ready again, or failed
        when it keeps killing its worker (`after_lost_run`). Returns the jobs moved and where to."""
        now, moved = utcnow(), []
        # A held job without a lease was claimed before leases existed (an upgrade): it is taken back too.
        lapsed = or_(Job.lease_expires_at < now, Job.lease_expires_at.is_(None))
        with self._sessions() as session:
            expired = list(session.scalars(select(Job).where(Job.state.in_(HELD), lapsed)
                                           .order_by(Job.lease_expires_at).limit(limit)))
        for job in expired:
            stop = StopRequest.of(job.error_code)
            lost = after_lost_run(job.state, job.lost_runs, job.isolate, max_attempts, stop_requested=stop is not None)
            values: dict[str, Any] = dict(lost_runs=lost.lost_runs, isolate=lost.isolate, **_NO_LEASE)
            if lost.state == JobState.FAILED:
                values.update(error_code=ErrorCode.TOO_MANY_ATTEMPTS.value, error_message=lost.failed_message,
                              finished_at=now)
            elif lost.state == JobState.CANCELLED:
                reason = stop.reason
                values.update(error_code=reason.value if reason else None, finished_at=now, error_message=(
                    job.error_message if reason else "cancelled: its worker died before it stopped"))
            else:
                values.update(sent_at=now)
            # compare-and-set on the lease seen: a holder that renewed meanwhile keeps its job
            same_owner = Job.lease_owner.is_(None) if job.lease_owner is None else Job.lease_owner == job.lease_owner
            if self.transition([job.id], [job.state], lost.state, where=[same_owner, lapsed], **values):
                moved.append((job, lost))
        return moved

    # -- messages the broker may have lost -------------------------------------------------------------
    def count_waiting_since(self, state: JobState, sent_before: dt.datetime) -> int:
        """Jobs waiting in `state` whose message went out before `sent_before`: each should have one on its
        queue, or delivered to a live consumer."""
        with self._sessions() as session:
            return session.scalar(select(func.count()).select_from(Job).where(
                Job.state == state, or_(Job.sent_at.is_(None), Job.sent_at < sent_before)))

    def job_states(self, job_ids: Iterable[str]) -> dict[str, JobState]:
        ids = list(set(job_ids))
        if not ids:
            return {}
        with self._sessions() as session:
            return dict(session.execute(select(Job.id, Job.state).where(Job.id.in_(ids))).all())

    def waiting_since(self, state: JobState, sent_before: dt.datetime, limit: int,
                      job_ids: Iterable[str] | None = None) -> list[Job]:
        """Jobs waiting in `state` whose message went out before `sent_before`, longest waiting first
        (only those of `job_ids`, when given)."""
        query = select(Job).where(Job.state == state, or_(Job.sent_at.is_(None), Job.sent_at < sent_before))
        if job_ids is not None:
            query = query.where(Job.id.in_(list(job_ids)))
        with self._sessions() as session:
            return list(session.scalars(query.order_by(Job.sent_at).limit(limit)))

    def mark_sent(self, job_ids: list[str]) -> None:
        now = utcnow()
        with self._sessions.begin() as session:
            for part in chunked(job_ids):
                session.execute(update(Job).where(Job.id.in_(part)).values(sent_at=now))


_NO_LEASE = dict(lease_owner=None, lease_expires_at=None)

