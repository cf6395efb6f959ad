"""The store on SQLite and PostgreSQL: idempotent jobs, compare-and-set claims, results and failures."""
from __future__ import annotations

import hashlib

from sqlalchemy import inspect

from schemas.sql.lifecycle import Holder
from schemas.states import ErrorCode, JobState
from schemas.sql.store import Reject, StoredPage

PARAMS = {"max_new_tokens": 16, "prompt_version": 1}
PREP, GPU0, GPU1 = (Holder(name, f"{name}/1", 30) for name in ("prepare@h", "gpu0@h", "gpu1@h"))


def _doc(store, text: str) -> str:
    data = text.encode()
    sha = hashlib.sha256(data).hexdigest()
    store.put_document(sha, data, "text/plain")
    return sha


def test_migrations_create_the_schema(store):
    tables = set(inspect(store.engine).get_table_names())
    assert {"documents", "pages", "batches", "batch_items", "jobs", "results", "alembic_version"} <= tables
    store.migrate()  # a second run is a no-op


def test_documents_are_content_addressed_and_read_back(store):
    sha = _doc(store, "Agreement between A and B.")
    assert store.put_document(sha, b"Agreement between A and B.", "text/plain") is False
    assert store.read_document(sha) == (b"Agreement between A and B.", "text/plain")


def test_documents_can_live_in_a_shared_blob_folder(database_url, tmp_path):
    from schemas.sql.store import Store

    store = Store(database_url, blob_dir=tmp_path / "blobs")
    store.migrate()
    data = "x" * 1000
    sha = hashlib.sha256(data.encode()).hexdigest()
    store.put_document(sha, data.encode(), "text/plain")
    assert (tmp_path / "blobs" / sha[:2] / sha).read_bytes() == data.encode()
    # Another host (another Store on the same database) reads it through the store
    other = Store(database_url, blob_dir=tmp_path / "blobs")
    assert other.read_document(sha)[0] == data.encode()
    store.close(), other.close()


def test_a_second_batch_over_the_same_documents_reuses_the_jobs(store):
    # Given a batch whose jobs are all done
    shas = [_doc(store, f"contract {i}") for i in range(3)]
    first = store.create_batch("summarize", PARAMS, "m", [(f"f{i}.txt", s) for i, s in enumerate(shas)])
    assert len(first.to_enqueue) == 3
    for job_id in first.to_enqueue:
        store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
        store.mark_ready(job_id, PREP)
        store.claim(job_id, JobState.READY, JobState.RUNNING, GPU0)
        store.finish(job_id, {"text": "ok"}, "ok", tokens_in=5, tokens_out=1, batch_size=3, holder=GPU0)
    # When the same documents (and one new one) are submitted again
    new_sha = _doc(store, "contract 3")
    second = store.create_batch("summarize", PARAMS, "m", [(f"f{i}.txt", s) for i, s in enumerate(shas + [new_sha])])
    # Then only the new document gets a job; the done ones are listed, not queued
    assert second.num_jobs == 4 and second.num_reused_done == 3
    assert len(second.to_enqueue) == 1 and second.to_enqueue[0] not in first.to_enqueue
    rows = store.batch_rows(second.batch_id)
    assert {job.id for _, job, _ in rows} >= set(first.to_enqueue)
    # A different task or model is different work
    other = store.create_batch("extract", PARAMS, "m", [("f0.txt", shas[0])])
    assert len(other.to_enqueue) == 1


def test_the_same_content_under_two_names_is_one_job_listed_under_both(store):
    sha = _doc(store, "same bytes")
    batch = store.create_batch("summarize", PARAMS, "m", [("a.txt", sha), ("copy/a.txt", sha)])
    assert batch.num_jobs == 1
    rows = store.batch_rows(batch.batch_id)
    assert [item.name for item, _, _ in rows] == ["a.txt", "copy/a.txt"] and rows[0][1].id == rows[1][1].id


def test_a_task_that_reads_the_file_name_makes_a_job_per_name(store):
    sha = _doc(store, "same bytes")
    batch = store.create_batch("nda", PARAMS, "m", [("a.txt", sha), ("copy/a.txt", sha)], key_by_name=True)
    assert batch.num_jobs == 2
    assert sorted(job.params["filename"] for _, job, _ in store.batch_rows(batch.batch_id)) == ["a.txt", "copy/a.txt"]


def test_task_definitions_are_kept_once_under_their_hash_with_the_batch(store):
    store.put_task("h" * 64, "nda", {"name": "nda", "prompt": "{{ text }}"})
    store.put_task("h" * 64, "nda", {"name": "nda", "prompt": "{{ text }}"})
    assert store.get_task("h" * 64) == {"name": "nda", "prompt": "{{ text }}"}
    batch = store.create_batch("nda", {"task": "h" * 64}, "m", [("a.txt", _doc(store, "a"))], task_hash="h" * 64)
    assert store.get_batch(batch.batch_id).task_hash == "h" * 64


def test_claims_are_compare_and_set(store):
    sha = _doc(store, "x")
    job_id = store.create_batch("summarize", PARAMS, "m", [("x.txt", sha)]).to_enqueue[0]
    assert store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP) is not None
    # A duplicated message finds the job taken and does nothing; a retried claim by its holder gets it back
    assert store.claim(job_id, JobState.QUEUED, JobState.PREPARING, GPU1) is None
    assert store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP) is not None
    assert store.mark_ready(job_id, PREP)
    job = store.claim(job_id, JobState.READY, JobState.RUNNING, GPU0, count_attempt=True)
    assert job.state == JobState.RUNNING and job.attempts == 1 and job.worker == "gpu0@h"
    assert job.lease_owner == "gpu0@h/1" and job.lease_expires_at is not None
    assert store.claim(job_id, JobState.READY, JobState.RUNNING, GPU1, count_attempt=True) is None


def test_only_the_holder_records_an_outcome(store):
    sha = _doc(store, "y")
    job_id = store.create_batch("summarize", PARAMS, "m", [("y.txt", sha)]).to_enqueue[0]
    store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
    assert not store.mark_ready(job_id, GPU0)
    assert not store.fail(job_id, ErrorCode.PDF_CORRUPT, "not mine", holder=GPU0)
    assert store.get_job(job_id).state == JobState.PREPARING


def test_failed_jobs_keep_their_reason_and_are_retried_by_a_resubmit(store):
    sha = _doc(store, "z")
    batch = store.create_batch("summarize", PARAMS, "m", [("z.txt", sha)])
    job_id = batch.to_enqueue[0]
    store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
    assert store.fail(job_id, ErrorCode.PDF_CORRUPT, "bad xref", holder=PREP)
    job = store.get_job(job_id)
    assert (job.state, job.error_code, job.error_message) == (JobState.FAILED, "pdf_corrupt", "bad xref")
    assert store.batch_counts(batch.batch_id)[JobState.FAILED] == 1
    again = store.create_batch("summarize", PARAMS, "m", [("z.txt", sha)])
    assert again.to_enqueue == [job_id]
    assert store.get_job(job_id).state == JobState.QUEUED


def test_finish_records_the_result_and_how_it_ran(store):
    sha = _doc(store, "w")
    batch = store.create_batch("extract", PARAMS, "m", [("w.txt", sha)])
    job_id = batch.to_enqueue[0]
    store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
    store.mark_ready(job_id, PREP)
    store.claim(job_id, JobState.READY, JobState.RUNNING, GPU0, count_attempt=True)
    assert not store.finish(job_id, {}, "", tokens_in=0, tokens_out=0, batch_size=1, holder=GPU1)  # not its holder
    assert store.finish(job_id, {"json": {"revenue": 5}}, '{"revenue": 5}', tokens_in=40, tokens_out=7, batch_size=12,
                        holder=GPU0)
    assert not store.finish(job_id, {}, "", tokens_in=0, tokens_out=0, batch_size=1, holder=GPU0)  # only once
    (item, job, result), = store.batch_rows(batch.batch_id)
    assert item.name == "w.txt" and job.state == JobState.DONE
    assert (job.tokens_in, job.tokens_out, job.batch_size) == (40, 7, 12)
    assert result.data == {"json": {"revenue": 5}}


def test_pages_are_stored_in_order_with_their_source(store):
    sha = _doc(store, "p")
    image_sha = _doc(store, "pretend this is a PNG")
    assert store.load_pages(sha) is None
    pages = [StoredPage("one", "text"), StoredPage("", "image", image_sha), StoredPage("three", "ocr", image_sha)]
    store.save_pages(sha, pages)
    assert store.load_pages(sha) == pages


def test_rejected_paths_count_as_failed_and_are_listed(store):
    sha = _doc(store, "ok")
    batch = store.create_batch("summarize", PARAMS, "m", [("ok.txt", sha)],
                               rejects=[Reject("pipe", ErrorCode.NOT_REGULAR_FILE, "a FIFO")])
    assert store.batch_counts(batch.batch_id) == {JobState.QUEUED: 1, JobState.FAILED: 1}
    (reject,) = store.batch_rejects(batch.batch_id)
    assert (reject.name, reject.error_code) == ("pipe", "not_regular_file")
    assert store.unit_counts(batch.batch_id) == (1, 2)


def test_chunk_jobs_count_down_to_their_parent_and_are_reused(store):
    # Given a document job split into three chunks
    sha = _doc(store, "long")
    batch = store.create_batch("summarize", PARAMS, "m", [("long.txt", sha)])
    parent_id = batch.to_enqueue[0]
    store.claim(parent_id, JobState.QUEUED, JobState.PREPARING, PREP)
    inputs = [[{"text": f"part {i}"}] for i in range(3)]
    pending, all_done = store.create_chunks(parent_id, 1, inputs, PREP)
    assert len(pending) == 3 and not all_done
    parent = store.get_job(parent_id)
    assert parent.state == JobState.WAITING and parent.lease_owner is None  # a waiting parent holds no lease
    assert store.unit_counts(batch.batch_id) == (0, 4)
    # When each chunk finishes, only the last one reports the level complete
    finished = []
    for i, chunk_id in enumerate(pending):
        store.claim(chunk_id, JobState.READY, JobState.RUNNING, GPU0, count_attempt=True)
        store.finish(chunk_id, {"text": f"answer {i}"}, f"answer {i}", tokens_in=1, tokens_out=1, batch_size=3,
                     holder=GPU0)
        finished.append(store.chunk_finished(parent_id))
    assert finished == [False, False, True]
    assert store.chunk_outputs(parent_id, 1) == [{"text": f"answer {i}"} for i in range(3)]
    # Then the parent gets its reduce input and is ready for inference
    store.set_reduce_input(parent_id, [{"text": "combined"}])
    parent = store.get_job(parent_id)
    assert (parent.state, parent.input_parts) == (JobState.READY, [{"text": "combined"}])
    # And when the document is tried again (its reduce failed, and it was resubmitted), its chunks are reused
    assert store.fail(parent_id, ErrorCode.SCHEMA_INVALID, "reduce answer invalid", holder=None)
    assert store.create_batch("summarize", PARAMS, "m", [("long.txt", sha)]).to_enqueue == [parent_id]
    store.claim(parent_id, JobState.QUEUED, JobState.PREPARING, PREP)
    assert store.create_chunks(parent_id, 1, inputs, PREP) == ([], True)


def test_upgrading_an_older_database_keeps_every_row(database_url):
    # Given a database at revision 0002 holding a batch, its job, its item and a result
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from schemas.sql.db import MIGRATIONS_DIR, make_engine, migrate

    engine = make_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")
    now = "2026-11-01 00:00:00"
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO documents (sha256, size_bytes, media_type, created_at) "
                                "VALUES ('d', 1, 'text/plain', :now)"), {"now": now})
        connection.execute(text("INSERT INTO jobs (id, idempotency_key, document_sha256, task, params, model, state, "
                                "priority, attempts, created_at, updated_at, chunks_done) VALUES ('j', 'k', 'd', "
                                "'summarize', '{}', 'm', 'done', 0, 1, :now, :now, 0)"), {"now": now})
        connection.execute(text("INSERT INTO results (job_id, data, raw_text, created_at) "
                                "VALUES ('j', '{}', 'ok', :now)"), {"now": now})
        connection.execute(text("INSERT INTO batches (id, task, model, priority, created_at) "
                                "VALUES ('b', 'summarize', 'm', 0, :now)"), {"now": now})
        connection.execute(text("INSERT INTO batch_items (batch_id, job_id, name) VALUES ('b', 'j', 'a.txt')"))
    # When it is brought to the newest revision (SQLite copies tables to change them)
    migrate(engine)
    # Then nothing is lost, and a batch may now list one job under two names
    with engine.begin() as connection:
        assert connection.execute(text("SELECT count(*) FROM results")).scalar() == 1
        connection.execute(text("INSERT INTO batch_items (batch_id, job_id, name) VALUES ('b', 'j', 'copy/a.txt')"))
        assert connection.execute(text("SELECT name FROM batch_items ORDER BY name")).scalars().all() == [
            "a.txt", "copy/a.txt"]
    engine.dispose()
