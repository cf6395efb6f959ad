"""What wraps every task, in one place (as dramatiq's middleware wraps every message): the claim under
this process's lease, the lease kept while the work runs, and the mapping of a failure to the job's
failed state with its reason code. A task body is then only its stage.

A document's own fault becomes its failed state (and its document's, for a chunk). A database away for
longer than `db_retry_s` is not the document's fault: the job is let go as it is and comes back when
its lease expires. A duplicate or late message finds its job not in the state it claims from, and
does nothing.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, TypeVar

from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from schemas.sql.lifecycle import is_infrastructure_error
from schemas.sql.models import Job
from schemas.states import DocbatchError, ErrorCode, JobCancelled, JobState
from worker.service.runtime import Runtime

log = logging.getLogger(__name__)
T = TypeVar("T")


@contextlib.contextmanager
def held(rt: Runtime, job_id: str, from_state: JobState, to_state: JobState, *,
         count_attempt: bool = False, isolate: bool | None = None) -> Iterator[Job | None]:
    """Claim the job (None when it is not in `from_state` any more, or given `isolate`, when its isolation
    changed) and keep its lease renewed until the block ends."""
    job = rt.store.claim(job_id, from_state, to_state, rt.holder, count_attempt=count_attempt, isolate=isolate)
    if job is None:
        log.debug("job %s is not %s any more (a duplicate or late message); nothing to do", job_id, from_state.value)
        yield None
        return
    rt.held.add(job_id)
    try:
        yield job
    finally:
        rt.held.discard(job_id)


def fail_on_error(rt: Runtime, job: Job, work: Callable[[], T]) -> T | None:
    """Run `work` for a job this process holds and return its value; turn its failure into the job's
    failed state with a reason code (and its document's, for a chunk) and return None. A job `cancel`
    stopped ends cancelled."""
    raw_text, tokens = None, {}
    try:
        return work()
    except JobCancelled as e:
        if rt.store.cancel_held(job.id, rt.holder, str(e)):
            log.info("%s %s", rt.store.describe_job(job.id), e)
        return None
    except DocbatchError as e:
        log.info("%s failed: %s", rt.store.describe_job(job.id), e)
        code, message, raw_text = e.code, e.message, e.raw_text
        tokens = dict(tokens_in=e.tokens_in, tokens_out=e.tokens_out)
    except SoftTimeLimitExceeded:
        code, message = ErrorCode.EXTRACT_TIMEOUT, "extraction ran past prepare_timeout_s"
    except MemoryError:
        code, message = ErrorCode.EXTRACT_MEMORY, "extraction ran out of its memory limit (prepare_memory_mb)"
    except Exception as e:  # noqa: BLE001 - a bug in one job must not stop the worker
        if is_infrastructure_error(e):
            log.error("job %s: the database was away for longer than db_retry_s (%s); letting the job go",
                      job.id, e)
            return None
        log.exception("%s failed unexpectedly", rt.store.describe_job(job.id))
        code, message = ErrorCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}"
    rt.store.fail(job.id, code, message, raw_text, holder=rt.holder, **tokens)
    if job.parent_id:
        rt.store.fail(job.parent_id, ErrorCode.CHUNK_FAILED, f"chunk {job.chunk_index + 1} (level {job.chunk_level}) "
                                                             f"failed: {code.value}: {message}", holder=None)
    return None


def fail_hard_timeout(rt: Runtime, job_id: str, exception: BaseException) -> bool:
    """In a prepare worker's parent: Celery killed the child extracting `job_id` at its hard time limit (the
    soft one did not stop it), so the job fails with `extract_timeout` now, rather than coming back by its
    lease to hang again. True when the job was failed."""
    if not isinstance(exception, TimeLimitExceeded):
        return False
    log.error("%s: extraction killed at the hard time limit (prepare_timeout_s + 30 s)", rt.store.describe_job(job_id))
    return rt.store.fail_abandoned(job_id, JobState.PREPARING, ErrorCode.EXTRACT_TIMEOUT,
                                   f"extraction did not stop at prepare_timeout_s ({rt.settings.prepare_timeout_s} s) "
                                   "and its process was killed")
