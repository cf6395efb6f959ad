"""OpenAI's batch objects in the store (mixed into `schemas.sql.store.Store`), beside the docbatch batches they are.

Every change of an API batch's `status` is a compare-and-set on the status it had, so any number of API processes
may move batches on. Intake and finalizing are leased (`lease_owner`, `lease_until`): one process does each, and
another takes it over once the lease has run out.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Iterable

from sqlalchemy import case, func, or_, select, update

from schemas.sql.api_files import page_after
from schemas.sql.models import ApiBatch, BatchItem, BatchReject, Job, utcnow
from schemas.states import JobState

ENDED = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class RequestCounts:
    """A batch's requests by outcome, and the tokens of those done."""

    total: int = 0
    completed: int = 0  # done
    failed: int = 0  # failed, cancelled (expired too), or rejected at intake
    unfinished: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def as_values(self) -> dict[str, int]:
        return dict(num_total=self.total, num_completed=self.completed, num_failed=self.failed,
                    num_unfinished=self.unfinished, input_tokens=self.input_tokens, output_tokens=self.output_tokens)


class ApiBatchStore:
    """API batches: made `validating`, moved on by compare-and-set, counted from their jobs."""

    _sessions: Any

    def add_api_batch(self, **values: Any) -> ApiBatch:
        with self._sessions.begin() as session:
            row = ApiBatch(status="validating", created_at=utcnow(), **values)
            session.add(row)
            return row

    def get_api_batch(self, key_id: str, batch_id: str) -> ApiBatch | None:
        """The key's batch; None for another key's or no such id."""
        with self._sessions() as session:
            return session.scalar(select(ApiBatch).where(ApiBatch.id == batch_id, ApiBatch.key_id == key_id))

    def api_batches(self, key_id: str, *, after: str | None, limit: int) -> tuple[list[ApiBatch], bool]:
        """A page of the key's batches, newest first, and whether more follow."""
        with self._sessions() as session:
            cursor = session.scalar(select(ApiBatch).where(ApiBatch.id == after, ApiBatch.key_id == key_id)) \
                if after else None
            query = page_after(select(ApiBatch).where(ApiBatch.key_id == key_id), ApiBatch, cursor, True)
            rows = list(session.scalars(query.limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def move_api_batch(self, batch_id: str, from_statuses: Iterable[str], *, owner: str | None = None,
                       session: Any = None, **values: Any) -> bool:
        """Set `values` on the batch if its status is still one of `from_statuses` (and, given `owner`, that
        process holds its lease). True if it moved."""
        stmt = update(ApiBatch).where(ApiBatch.id == batch_id, ApiBatch.status.in_(list(from_statuses)))
        if owner is not None:
            stmt = stmt.where(ApiBatch.lease_owner == owner)
        if session is not None:
            return bool(session.execute(stmt.values(**values)).rowcount)
        with self._sessions.begin() as own:
            return bool(own.execute(stmt.values(**values)).rowcount)

    def lease_api_batch(self, batch_id: str, statuses: Iterable[str], owner: str, lease_s: float) -> ApiBatch | None:
        """Take the batch's lease for `owner` if it is in one of `statuses` and nobody else holds it."""
        now = utcnow()
        with self._sessions.begin() as session:
            moved = session.execute(
                update(ApiBatch).where(ApiBatch.id == batch_id, ApiBatch.status.in_(list(statuses)),
                                       or_(ApiBatch.lease_until.is_(None), ApiBatch.lease_until < now,
                                           ApiBatch.lease_owner == owner))
                .values(lease_owner=owner, lease_until=now + dt.timedelta(seconds=lease_s))).rowcount
            return session.get(ApiBatch, batch_id) if moved else None

    def due_api_batches(self, now: dt.datetime, stale_before: dt.datetime, limit: int = 100) -> list[ApiBatch]:
        """Batches a sweep should look at: intake or finalizing whose lease has lapsed, windows that ended,
        counts older than `stale_before`."""
        lapsed = or_(ApiBatch.lease_until.is_(None), ApiBatch.lease_until < now)
        with self._sessions() as session:
            return list(session.scalars(select(ApiBatch).where(or_(
                ApiBatch.status.in_(["validating", "finalizing", "cancelling"]) & lapsed,
                (ApiBatch.status == "in_progress") & or_(ApiBatch.expires_at < now, ApiBatch.counted_at.is_(None),
                                                         ApiBatch.counted_at < stale_before)))
                .order_by(ApiBatch.created_at).limit(limit)))

    def count_requests(self, batch_id: str) -> RequestCounts:
        """One aggregate over the batch's jobs (by state), plus the lines rejected at intake."""
        done = Job.state == JobState.DONE
        with self._sessions() as session:
            rows = session.execute(
                select(Job.state, func.count(), func.sum(case((done, Job.tokens_in), else_=0)),
                       func.sum(case((done, Job.tokens_out), else_=0)))
                .join(BatchItem, BatchItem.job_id == Job.id).where(BatchItem.batch_id == batch_id)
                .group_by(Job.state)).all()
            rejected = session.scalar(select(func.count()).select_from(BatchReject)
                                      .where(BatchReject.batch_id == batch_id))
        by_state = {state: n for state, n, _, _ in rows}
        return RequestCounts(
            total=sum(by_state.values()) + rejected, completed=by_state.get(JobState.DONE, 0),
            failed=by_state.get(JobState.FAILED, 0) + by_state.get(JobState.CANCELLED, 0) + rejected,
            unfinished=sum(n for state, n in by_state.items() if not state.is_terminal),
            input_tokens=sum(int(i or 0) for _, _, i, _ in rows), output_tokens=sum(int(o or 0) for _, _, _, o in rows))

    def claim_recount(self, batch_id: str, now: dt.datetime, stale_before: dt.datetime) -> bool:
        """True for the one caller that may recount an in-progress batch whose counts are older than `stale_before`
        (any number of processes polling one batch cost one count per interval)."""
        with self._sessions.begin() as session:
            return bool(session.execute(
                update(ApiBatch).where(ApiBatch.id == batch_id, ApiBatch.status == "in_progress",
                                       or_(ApiBatch.counted_at.is_(None), ApiBatch.counted_at < stale_before))
                .values(counted_at=now)).rowcount)

    def save_counts(self, batch_id: str, counts: RequestCounts, counted_at: dt.datetime) -> None:
        """Cache the counts on an unfinished batch (an ended batch's counts are frozen)."""
        with self._sessions.begin() as session:
            session.execute(update(ApiBatch).where(ApiBatch.id == batch_id, ApiBatch.status.not_in(ENDED))
                            .values(counted_at=counted_at, **counts.as_values()))

    def end_api_batch(self, batch_id: str, owner: str, end_status: str, counts: RequestCounts,
                      files: dict[str, tuple[str, Iterable[bytes]]], key_id: str,
                      files_expire_at: dt.datetime) -> bool:
        """In one transaction: the batch's output files (`files`: column -> (file name, parts)) and its move to
        `end_status`, if `owner` still holds its lease; otherwise nothing is written. True if it moved."""
        now = utcnow()
        with self._sessions.begin() as session:
            row = session.scalar(select(ApiBatch).where(ApiBatch.id == batch_id, ApiBatch.lease_owner == owner,
                                                        ApiBatch.status.in_(["finalizing", "cancelling"]))
                                 .with_for_update())
            if row is None:
                return False
            values: dict[str, Any] = {f"{end_status}_at": now, "status": end_status, "lease_owner": None,
                                      "lease_until": None, "counted_at": now, **counts.as_values()}
            for column, (filename, parts) in files.items():
                values[column] = self.add_api_file(key_id, "batch_output", filename, parts,
                                                   expires_at=files_expire_at, session=session).id
            session.execute(update(ApiBatch).where(ApiBatch.id == batch_id).values(**values))
            return True
