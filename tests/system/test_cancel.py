"""`docbatch cancel` on one real worker holding twice the requests its engine runs: what the engine has not
started is cancelled at once, what it generates finishes (or stops, with --now), and the report says which.
The same worker's log holds lines only: no progress bar, no job's message delivered twice while it is held."""
from __future__ import annotations

import re
from collections import Counter

import pytest
from click.testing import CliRunner
from conftest import PARTIES_TASK, shared_worker_settings, worker_process
from test_pipeline import QUIET, write_documents

from producer.cli import main as cli
from producer.intake.submit import Source, submit
from producer.results.progress import batch_status, wait_for_batch
from schemas.messages import make_celery
from schemas.sql.store import Store
from schemas.states import JobState
from services import wait_for

pytestmark = pytest.mark.slow
MODULE_REDIS_DB = 14
REPORT = re.compile(r"cancelled (\d+) jobs? of batch \w+(?: \((\d+) of them held by a worker, stopped in its engine"
                    r"(?: before it started them)?\))?(?:; (\d+) whose answers are being generated will finish)?")


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory, small_model_dir):
    """One worker: 8 rows in its engine and 16 jobs held (max_inflight, twice the rows), leases renewed every 2 s,
    and Redis delivering again a message unacknowledged for 10 s (the smallest visibility_timeout_s), so that a
    job held that long is what the worker must keep from being delivered twice."""
    return shared_worker_settings(tmp_path_factory.mktemp("cancel"), small_model_dir, MODULE_REDIS_DB,
                                  max_batch_size=8, visibility_timeout_s=10, lease_s=6)


@pytest.fixture(scope="module")
def worker_log(module_settings, tmp_path_factory):
    path = tmp_path_factory.mktemp("logs") / "worker.log"
    with worker_process(module_settings, path) as process:
        yield process, path


def _cancel(settings, *args: str) -> tuple[int, int, int]:
    """`docbatch cancel ARGS`: (jobs cancelled, of them stopped in the worker's engine, jobs that will finish)."""
    done = CliRunner().invoke(cli, ["cancel", *args], env=settings.to_env())
    assert done.exit_code == 0, done.output
    found = REPORT.search(done.output)
    assert found and "did not answer" not in done.output, done.output
    return tuple(int(n or 0) for n in found.groups())


def test_cancel_on_one_worker_stops_what_its_engine_has_not_started(module_settings, worker_log, tmp_path):
    worker, _ = worker_log
    store = Store(module_settings.effective_database_url)
    store.migrate()
    # Given a batch of 40 short documents (for a task of short answers) on one worker holding 16 of them at a time
    write_documents(tmp_path / "inbox", 40)
    for name in ("broken.pdf", "empty.txt", "bail.txt"):
        (tmp_path / "inbox" / name).unlink()
    batch_id = submit(module_settings, store, make_celery(module_settings), Source(paths=(tmp_path / "inbox",)),
                      PARTIES_TASK, console=QUIET).batch.batch_id
    # ... and more jobs held than its engine runs: some wait in the engine, not started
    wait_for(lambda: batch_status(store, batch_id).running > module_settings.max_batch_size,
             "the worker to hold more jobs than its engine's rows", timeout_s=600, every_s=0.1)

    # When the batch is cancelled (by a prefix of its id), then cancelled again with --now
    cancelled, in_engine, finishing = _cancel(module_settings, batch_id[:8])
    stopped, stopped_in_engine, still_finishing = _cancel(module_settings, "--now", batch_id[:8])
    status = wait_for_batch(store, batch_id, console=QUIET, timeout_s=600,
                            check_alive=lambda: worker.poll() is None or pytest.fail("worker died"))

    # Then the jobs the engine had not started were cancelled at once, not only those nobody held
    assert in_engine >= 1 and cancelled > in_engine
    # ... --now stopped what was still being generated, and nothing was left to finish after it
    assert stopped == stopped_in_engine <= finishing and still_finishing == 0
    # ... the reports add up to what happened: every job cancelled or done, none failed, no lease left held
    assert (status.cancelled, status.failed) == (cancelled + stopped, 0)
    assert status.done == 40 - status.cancelled
    jobs = [job for _, job, _ in store.batch_rows(batch_id)]
    assert all(job.lease_owner is None for job in jobs)
    reasons = Counter(job.error_message for job in jobs if job.state == JobState.CANCELLED)
    assert reasons["cancelled before the engine started it"] >= in_engine - stopped

    # When a new batch comes after the aborts
    folder = tmp_path / "after"
    folder.mkdir()
    (folder / "nda.txt").write_text("Mutual NDA between Acme Corp and Globex Ltd, effective 1 May 2024.")
    again = submit(module_settings, store, make_celery(module_settings), Source(paths=(folder,)), PARTIES_TASK,
                   console=QUIET).batch.batch_id
    # Then the same worker runs it: the cancelled requests left nothing behind in its engine
    assert wait_for_batch(store, again, console=QUIET, timeout_s=600).done == 1
    store.close()


def test_the_workers_log_is_lines_and_no_job_ran_twice(worker_log):
    # Given the log of the worker that ran this module's batches, its model loaded from a folder (weights
    # loaded with transformers' progress bar) and jobs held longer than Redis' visibility timeout
    _, path = worker_log
    text = path.read_bytes().decode("utf-8", "replace")
    # Then no progress bar drew carriage returns into it
    assert "\r" not in text
    # ... and no infer task ran twice: a held job's message was never delivered again
    runs = Counter(re.findall(r"Task docbatch\.infer\[([0-9a-f-]+)\] succeeded", text))
    assert runs and max(runs.values()) == 1
