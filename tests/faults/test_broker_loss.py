"""Redis restarted under a running worker (issue 25, item 2): the infer process reconnects with its model loaded,
and the jobs it held finish there and are recorded. A real `docbatch worker --gpus cpu` with the packaged small
model, on a redis-server of the test's own (AOF, a free port) that the test kills and starts again, and SQLite.

Whether kombu's close used to stop the infer process here depends on which of its sockets it reads the loss from
first (`worker.service.redis_transport`); tests/worker/service/test_redis_transport.py closes a consumer's connection
in the state that stopped it."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from faults.harness import Redis, Worker, _all_ended, _submit, _wait_for, check_invariants, fault_settings, \
    write_documents
from schemas.sql.models import Job
from schemas.sql.store import Store
from schemas.states import JobState

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to restart")]
OUTAGE_S = 10


def test_the_infer_process_outlives_a_redis_restart_and_finishes_the_jobs_it_held(small_model_dir, tmp_path):
    # Given a worker on its own Redis, its infer process holding jobs of a batch of eight contracts
    server = Redis(tmp_path / "redis")
    server.start()
    settings = fault_settings(tmp_path / "home", str(small_model_dir)).model_copy(update={
        "broker_url": server.url, "database_url": f"sqlite:///{tmp_path / 'docbatch.sqlite3'}"})
    store = Store(settings.effective_database_url)
    store.migrate()
    worker = Worker(settings, tmp_path / "worker.log")
    worker.start()
    try:
        write_documents(tmp_path / "run" / "docs", 8, 0)
        batch_id = _submit(settings, store, tmp_path / "run" / "docs")
        _wait_for(lambda: _running(store, batch_id), "the infer process to hold jobs", timeout_s=600)
        [infer_pid] = _infer_pids(worker)
        held = _running(store, batch_id)
        assert {job.lease_owner.rsplit("/", 1)[1] for job in held} == {infer_pid}
        # When Redis is killed and started again 10 s later (its AOF keeps the queues)
        server.kill()
        time.sleep(OUTAGE_S)
        server.start()
        _wait_for(lambda: _all_ended(store, batch_id), "every job to end", timeout_s=900)
        # Then the same infer process, never restarted, finished the jobs it held (one attempt each), and every
        # job of the batch is done with its result
        assert _infer_pids(worker) == [infer_pid]
        log = worker.log_path.read_text(errors="replace")
        assert "Unrecoverable error" not in log and "restarting in" not in log
        finished = {job.id: store.get_job(job.id) for job in held}
        assert {(job.state, job.attempts) for job in finished.values()} == {(JobState.DONE, 1)}
        assert check_invariants(store, batch_id, expect_failed=set()) == []
    finally:
        worker.stop()
        if server.process.poll() is None:
            server.kill()
        store.close()


def _running(store: Store, batch_id: str) -> list[Job]:
    return [job for _, job, _ in store.batch_rows(batch_id) if job.state == JobState.RUNNING]


def _infer_pids(worker: Worker) -> list[str]:
    return subprocess.run(["pgrep", "-g", str(worker.process.pid), "-f", "infer cpu@"],
                          capture_output=True, text=True).stdout.split()
