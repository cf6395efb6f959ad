"""An operator's side of the store: ids as people type them (any unique prefix), cancel and retry.

`cancel` moves the jobs nobody holds to `cancelled` at once. A running job is held by a GPU worker, whose
engine may not have started it yet (a worker holds up to `max_inflight` jobs, twice the rows its engine
runs): such a job is told to stop (`schemas.states.StopRequest`, in its `error_code`), and its worker ends
it `cancelled` unless its answer is already being generated (then it finishes), or at once with `now`.
The worker hears of it at its next lease renewal, or at once from the broadcast the caller sends
(`schemas.messages.announce_cancel`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select, update

from schemas.sql.db import chunked
from schemas.sql.lifecycle import HELD, Holder, retried
from schemas.sql.models import Batch, BatchItem, Job, utcnow
from schemas.states import TRANSITIONS, ErrorCode, JobState, StopRequest

MIN_PREFIX_CHARS = 6  # as git and docker: short enough to type, long enough to be unique in practice
ID_KINDS = {"batch": Batch, "job": Job}


class UnknownId(LookupError):
    """No batch or job has this id (or id prefix)."""


class AmbiguousId(LookupError):
    """An id prefix that more than one batch or job starts with; the message lists them."""


@dataclass(frozen=True)
class Cancellation:
    """What a cancel did in the store: jobs cancelled at once, and running jobs whose workers were told to stop."""

    cancelled: int
    held: list[str]  # running jobs told to stop (their workers end them cancelled, or let them finish)
    now: bool


class Control:
    """Mixed into `schemas.sql.store.Store`."""

    _sessions: Any
    retry_s: float = 0

    def resolve_id(self, text: str, kinds: tuple[str, ...] = ("batch",)) -> tuple[str, str]:
        """(kind, whole id) for `text`: a whole id, or a prefix of at least `MIN_PREFIX_CHARS` characters that
        one batch or job (of `kinds`) starts with. Raises `UnknownId`, or `AmbiguousId` listing the matches."""
        prefix = text.strip().lower()
        what = " or ".join(kinds)
        if len(prefix) < MIN_PREFIX_CHARS:
            raise UnknownId(f"{text!r} is too short: give at least {MIN_PREFIX_CHARS} characters of the {what} id")
        matches: list[tuple[str, str]] = []
        with self._sessions() as session:
            for kind in kinds:
                model = ID_KINDS[kind]
                matches += [(kind, found) for found in session.scalars(
                    select(model.id).where(model.id.startswith(prefix, autoescape=True)).order_by(model.id).limit(6))]
        exact = [match for match in matches if match[1] == prefix]
        if exact or len(matches) == 1:
            return (exact or matches)[0]
        if not matches:
            raise UnknownId(f"no {what} {text!r}")
        listed = ", ".join(f"{kind} {found}" for kind, found in matches[:5])
        raise AmbiguousId(f"{text!r} is ambiguous: it begins {listed}{', ...' if len(matches) > 5 else ''}; "
                          "give more characters")

    # -- cancel --------------------------------------------------------------------------------------
    def cancel_batch(self, batch_id: str, code: ErrorCode | None = None, message: str | None = None, *,
                     now: bool = False) -> Cancellation:
        """Cancel the batch's jobs and their chunks (see the module's docstring for running ones), with a reason
        `code` and `message` when given (an API batch's window ended: `expired`). A job being extracted is
        cancelled and its extraction dropped."""
        in_batch = select(BatchItem.job_id).where(BatchItem.batch_id == batch_id)
        return self._cancel(or_(Job.id.in_(in_batch), Job.parent_id.in_(in_batch)), StopRequest.asked(now, code),
                            code, message)

    def cancel_job(self, job_id: str, *, now: bool = False) -> Cancellation:
        """Cancel a document's job with its chunks (a chunk's id stands for its document's job)."""
        job = self._job(job_id)
        document_id = job.parent_id or job.id
        return self._cancel(or_(Job.id == document_id, Job.parent_id == document_id), StopRequest.asked(now, None))

    def _job(self, job_id: str) -> Job:
        with self._sessions() as session:
            job = session.get(Job, job_id)
        if job is None:
            raise UnknownId(f"no job {job_id!r}")
        return job

    def _cancel(self, which: Any, stop: StopRequest, code: ErrorCode | None = None,
                message: str | None = None) -> Cancellation:
        reason = dict(error_code=code.value, error_message=message) if code else {}
        at_once = [s for s in JobState if JobState.CANCELLED in TRANSITIONS[s] and s != JobState.RUNNING]
        # a plain cancel never takes back a --now already asked for
        not_weaker = [] if stop.is_now else [or_(Job.error_code.is_(None),
                                                 Job.error_code != StopRequest.CANCEL_NOW.value)]
        cancelled, held = 0, []
        with self._sessions.begin() as session:
            ids = list(session.scalars(select(Job.id).where(which)))
            for part in chunked(ids):  # a batch of 50,000 jobs: SQLite takes at most 32,766 values a statement
                cancelled += self.transition(part, at_once, JobState.CANCELLED, session=session, finished_at=utcnow(),
                                             lease_owner=None, lease_expires_at=None, **reason)
                running = list(session.scalars(select(Job.id).where(Job.id.in_(part), Job.state == JobState.RUNNING)))
                session.execute(update(Job).where(Job.id.in_(running), Job.state == JobState.RUNNING, *not_weaker)
                                .values(error_code=stop.value, error_message=message))
                held += running
        return Cancellation(cancelled, held, stop.is_now)

    # -- a worker's side of cancel ---------------------------------------------------------------------
    def stop_requests(self, holder: Holder, job_ids: list[str]) -> dict[str, bool]:
        """The jobs of `job_ids` that `holder` holds and `cancel` told to stop: job id -> whether now."""
        if not job_ids:
            return {}
        with self._sessions() as session:
            rows = session.execute(select(Job.id, Job.error_code).where(
                Job.id.in_(job_ids), Job.lease_owner == holder.owner, Job.state.in_(HELD),
                Job.error_code.in_([stop.value for stop in StopRequest]))).all()
        return {job_id: StopRequest.of(code).is_now for job_id, code in rows}

    @retried
    def cancel_held(self, job_id: str, holder: Holder, message: str) -> bool:
        """A running job `holder` stopped because it was told to: cancelled (with the stop's reason code and
        message, if it had one; else `message`), its lease released. False when it is not `holder`'s any more."""
        with self._sessions.begin() as session:
            asked = session.execute(select(Job.error_code, Job.error_message).where(Job.id == job_id)).one_or_none()
            stop = StopRequest.of(asked.error_code) if asked else None
            reason = stop.reason if stop else None
            why = dict(error_code=reason.value, error_message=asked.error_message) if reason else dict(
                error_code=None, error_message=message)
            return bool(self.transition([job_id], [JobState.RUNNING], JobState.CANCELLED, session=session,
                                        where=[Job.lease_owner == holder.owner], finished_at=utcnow(),
                                        lease_owner=None, lease_expires_at=None, **why))

    # -- retry -----------------------------------------------------------------------------------------
    def retry_batch(self, batch_id: str, error_code: str | None = None) -> list[Job]:
        """Queue again the batch's failed jobs (only those failed with `error_code`, when given) and its
        cancelled ones, with their attempts reset. Returns the jobs to send."""
        in_batch = select(BatchItem.job_id).where(BatchItem.batch_id == batch_id)
        from_states = [JobState.FAILED] if error_code else [JobState.FAILED, JobState.CANCELLED]
        where = [Job.error_code == error_code] if error_code else []
        with self._sessions.begin() as session:
            ids = list(session.scalars(select(Job.id).where(Job.id.in_(in_batch))))
            self.transition(ids, from_states, JobState.QUEUED, session=session, where=where, error_code=None,
                            error_message=None, attempts=0, lost_runs=0, isolate=False, finished_at=None,
                            sent_at=utcnow())
            session.flush()
            return list(session.scalars(select(Job).where(Job.id.in_(ids), Job.state == JobState.QUEUED)))
