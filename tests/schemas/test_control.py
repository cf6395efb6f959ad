"""An operator's side of the store, on SQLite and PostgreSQL: ids by unique prefix, cancel (held jobs told to
stop) and retry."""
from __future__ import annotations

import pytest
from test_lifecycle import GPU, PREP, _jobs, _lapse, _running

from schemas.sql.control import AmbiguousId, UnknownId
from schemas.sql.models import Batch, Job, utcnow
from schemas.states import ErrorCode, JobState, StopRequest


def test_a_unique_prefix_of_six_characters_or_more_names_a_batch_or_a_job(store):
    # Given a batch and its job
    batch_id, (job_id,) = _jobs(store, "a")
    # When they are named by prefixes, whole ids, or in capitals
    # Then each resolves to its kind and whole id; a job is found only where jobs are asked for
    assert store.resolve_id(batch_id[:6]) == ("batch", batch_id)
    assert store.resolve_id(batch_id.upper()) == ("batch", batch_id)
    assert store.resolve_id(job_id[:8], ("batch", "job")) == ("job", job_id)
    with pytest.raises(UnknownId, match="no batch"):
        store.resolve_id(job_id[:8])
    with pytest.raises(UnknownId, match="at least 6 characters"):
        store.resolve_id(batch_id[:5])
    with pytest.raises(UnknownId, match="no batch or job"):
        store.resolve_id("%%%%%%_", ("batch", "job"))  # LIKE's wildcards are taken as they are


def test_an_ambiguous_prefix_is_an_error_that_lists_the_matches(store):
    # Given two batches whose ids share their first 7 characters
    first, _ = _jobs(store, "one")
    twin = first[:7] + ("e" if first[7] == "f" else "f") * 25
    with store.engine.begin() as conn:
        conn.execute(Batch.__table__.insert().values(id=twin, task="summarize", model="m", priority=0,
                                                      created_at=utcnow()))
    # When the shared prefix is given, then a longer one
    with pytest.raises(AmbiguousId) as raised:
        store.resolve_id(first[:7])
    # Then the error lists both; one more character tells them apart
    assert f"batch {first}" in str(raised.value) and f"batch {twin}" in str(raised.value)
    assert store.resolve_id(twin[:8]) == ("batch", twin)


def test_cancel_ends_what_nobody_holds_and_tells_the_workers_to_stop_what_they_hold(store):
    # Given a batch with a queued, a ready, a running and a failed job
    batch_id, (queued, ready, running, failed) = _jobs(store, "q", "r", "run", "f")
    store.claim(ready, JobState.QUEUED, JobState.PREPARING, PREP)
    store.mark_ready(ready, PREP)
    _running(store, running)
    store.claim(failed, JobState.QUEUED, JobState.PREPARING, PREP)
    store.fail(failed, ErrorCode.PDF_CORRUPT, "bad xref", holder=PREP)
    # When it is cancelled
    done = store.cancel_batch(batch_id)
    # Then what nobody held is cancelled at once, and the running job's worker is told to stop it
    assert (done.cancelled, done.held, done.now) == (2, [running], False)
    assert [store.get_job(j).state for j in (queued, ready, running, failed)] == [
        JobState.CANCELLED, JobState.CANCELLED, JobState.RUNNING, JobState.FAILED]
    assert not store.claim(ready, JobState.READY, JobState.RUNNING, GPU)
    assert store.stop_requests(GPU, [running, queued]) == {running: False}
    # When it is cancelled again with --now, then once more without
    assert store.cancel_batch(batch_id, now=True).held == [running]
    store.cancel_batch(batch_id)
    # Then the stronger request stands
    assert store.get_job(running).error_code == StopRequest.CANCEL_NOW.value
    assert store.stop_requests(GPU, [running]) == {running: True}
    # When its worker stops it
    assert store.cancel_held(running, GPU, "cancelled before the engine started it")
    # Then it is cancelled, its lease released, and nothing is left to stop
    job = store.get_job(running)
    assert (job.state, job.lease_owner, job.error_code, job.error_message) == (
        JobState.CANCELLED, None, None, "cancelled before the engine started it")
    assert store.stop_requests(GPU, [running]) == {}
    # When only the jobs failed with one code are retried, then the others
    assert [j.id for j in store.retry_batch(batch_id, "out_of_memory")] == []
    assert [j.id for j in store.retry_batch(batch_id, "pdf_corrupt")] == [failed]
    assert sorted(j.id for j in store.retry_batch(batch_id)) == sorted([queued, ready, running, failed])
    job = store.get_job(failed)
    assert (job.state, job.error_code, job.attempts) == (JobState.QUEUED, None, 0)


def test_a_job_whose_answer_is_being_generated_finishes_and_the_stop_is_forgotten(store):
    # Given a running job told to stop, whose worker lets it finish (its answer was being generated)
    batch_id, (job_id,) = _jobs(store, "being generated")
    _running(store, job_id)
    store.cancel_batch(batch_id)
    # When it finishes
    assert store.finish(job_id, {"text": "ok"}, "ok", tokens_in=3, tokens_out=2, batch_size=1, holder=GPU)
    # Then it is done with its answer, and no stop lingers
    job = store.get_job(job_id)
    assert (job.state, job.error_code) == (JobState.DONE, None)


def test_a_job_told_to_stop_whose_worker_died_is_cancelled_not_run_again(store):
    batch_id, (job_id,) = _jobs(store, "orphan")
    _running(store, job_id)
    store.cancel_job(job_id)
    _lapse(store, job_id)
    ((job, lost),) = store.expire_leases(max_attempts=3)
    assert lost.state == JobState.CANCELLED
    assert store.get_job(job_id).state == JobState.CANCELLED


def test_cancelling_a_chunk_cancels_its_document_with_every_chunk(store):
    # Given a document waiting on two chunks, one of them running
    _, (parent,) = _jobs(store, "long")
    store.claim(parent, JobState.QUEUED, JobState.PREPARING, PREP)
    chunks, _ = store.create_chunks(parent, 1, [[{"text": "a"}], [{"text": "b"}]], PREP)
    store.claim(chunks[0], JobState.READY, JobState.RUNNING, GPU)
    # When one chunk's id is cancelled
    done = store.cancel_job(chunks[1])
    # Then the document and its other chunk are cancelled, and the running chunk's worker told to stop
    assert (done.cancelled, done.held) == (2, [chunks[0]])
    assert store.get_job(parent).state == JobState.CANCELLED
    with pytest.raises(UnknownId):
        store.cancel_job("0" * 32)
    assert store.get_job(chunks[0]).state == JobState.RUNNING and isinstance(store.get_job(chunks[0]), Job)
