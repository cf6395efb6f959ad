"""The whole pipeline with its real parts: a `docbatch worker` process on CPU, this machine's Redis,
the real small model, SQLite and PostgreSQL."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import (
    PARTIES_TASK,
    PARTIES_TASK_FILE,
    postgres_database,
    shared_worker_settings,
)
from rich.console import Console

from producer.cli import main as cli
from producer.service.embedded import free_port
from producer.results.export import batch_records
from producer.results.progress import wait_for_batch
from producer.intake.submit import Source, submit
from schemas.messages import make_celery
from schemas.states import JobState
from schemas.sql.store import Store

pytestmark = pytest.mark.slow
QUIET = Console(file=io.StringIO())
LATIN1_TEXT = "Bail commercial: la Société Générale Immobilière loue à Clément Müller; échéance annuelle à Lyon."
PARTIES = ["Acme Corp", "Globex Ltd", "Initech LLC", "Umbrella plc", "Stark GmbH", "Wayne SA"]


def write_documents(folder: Path, count: int) -> None:
    """`count` short contracts of varied length, plus a corrupt PDF, an empty file and a Latin-1 text."""
    folder.mkdir(parents=True)
    for i in range(count):
        a, b = PARTIES[i % 6], PARTIES[(i + 1) % 6]
        clauses = " ".join(f"Clause {k}: {a} shall deliver item {k} to {b} within {k + i} days." for k in range(1 + i % 5))
        (folder / f"contract_{i:02d}.txt").write_text(
            f"Services agreement no. {i} between {a} (supplier) and {b} (customer), dated {1 + i} March 2024. {clauses}")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\nendobj\ntrailer <<")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "bail.txt").write_bytes(LATIN1_TEXT.encode("latin-1"))


MODULE_REDIS_DB = 9


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory, small_model_dir):
    """One worker on PostgreSQL for this module's two worker tests: the whole pipeline runs once on each
    database, here on PostgreSQL, in every other pipeline module on SQLite (the store's own tests run on both)."""
    with postgres_database() as url:
        yield shared_worker_settings(tmp_path_factory.mktemp("pipeline"), small_model_dir, MODULE_REDIS_DB,
                                     database_url=url)


def test_documents_run_batched_bad_files_fail_with_reasons_and_resubmit_adds_nothing(
        module_settings, module_worker, tmp_path):
    # Given 10 contracts, a corrupt PDF, an empty file and a Latin-1 text in one folder
    folder = tmp_path / "inbox"
    write_documents(folder, 10)
    store = Store(module_settings.effective_database_url)
    store.migrate()
    app = make_celery(module_settings)

    # When the folder is submitted (for a task of short answers) and the batch runs to its end
    first = submit(module_settings, store, app, Source(paths=(folder,)), PARTIES_TASK, console=QUIET)
    status = wait_for_batch(store, first.batch.batch_id, console=QUIET, timeout_s=600,
                            check_alive=lambda: module_worker.poll() is None or pytest.fail("worker died"))

    # Then the good documents are done and the bad ones failed with stable reason codes
    assert (status.total, status.done, status.failed) == (13, 11, 2)
    rows = {item.name: (job, result) for item, job, result in store.batch_rows(first.batch.batch_id)}
    assert rows["inbox/broken.pdf"][0].error_code == "pdf_corrupt"
    assert rows["inbox/empty.txt"][0].error_code == "empty_file"
    # ... the Latin-1 file was read as the text it is
    latin1_sha = hashlib.sha256(LATIN1_TEXT.encode("latin-1")).hexdigest()
    assert [page.text for page in store.load_pages(latin1_sha)] == [LATIN1_TEXT]
    # ... and the 11 documents ran in fewer generate calls than documents (batch sizes are on the jobs)
    done = [job for job, _ in rows.values() if job.state == JobState.DONE]
    assert all(job.worker.startswith("cpu@") and job.batch_size >= 1 and job.tokens_out >= 1 for job in done)
    num_generate_calls = round(sum(1 / job.batch_size for job in done))
    assert num_generate_calls < len(done) and max(job.batch_size for job in done) > 1
    assert all(isinstance(result.data["json"]["parties"], list) for job, result in rows.values() if job.state == JobState.DONE)

    # When the same folder is submitted again
    second = submit(module_settings, store, app, Source(paths=(folder,)), PARTIES_TASK, console=QUIET)
    # Then no new job is made: the done ones are reused, only the two failed ones are retried
    job_ids = lambda batch_id: {job.id for _, job, _ in store.batch_rows(batch_id)}
    assert job_ids(second.batch.batch_id) == job_ids(first.batch.batch_id)
    assert second.batch.num_reused_done == 11
    assert set(second.batch.to_enqueue) == {rows["inbox/broken.pdf"][0].id, rows["inbox/empty.txt"][0].id}
    again = wait_for_batch(store, second.batch.batch_id, console=QUIET, timeout_s=300)
    assert (again.done, again.failed) == (11, 2)

    # And the CLI reports it: status as JSON, results as CSV with one record per job
    env = module_settings.to_env()
    result = CliRunner().invoke(cli, ["status", second.batch.batch_id, "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"batch": second.batch.batch_id, "total": 13, "queued": 0,
                                              "preparing": 0, "ready": 0, "running": 0, "waiting": 0, "done": 11,
                                              "failed": 2, "cancelled": 0}
    result = CliRunner().invoke(cli, ["results", second.batch.batch_id, "--format", "csv"], env=env)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 14 and lines[0].startswith("job_id,name,sha256,task,model,state,result,error_code")
    store.close()


def test_run_uses_an_embedded_redis_and_a_second_run_reuses_the_done_jobs(settings, tmp_path):
    # Given no Redis at the configured URL, a folder of three contracts, and a task file of short answers
    folder = tmp_path / "contracts"
    write_documents(folder, 3)
    for name in ("broken.pdf", "empty.txt", "bail.txt"):
        (folder / name).unlink()
    env = {**os.environ, **settings.to_env(), "DOCBATCH_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    command = [sys.executable, "-m", "producer.cli", "run", str(folder),
               "--task-file", str(PARTIES_TASK_FILE), "--out-dir", str(tmp_path / "out")]

    # When `docbatch run` is called twice
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    # Then both succeed, the first computes three jobs and the second reuses them (same job ids)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "started an embedded one" in first.stderr
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 jobs (3 already done, 0 queued)" in second.stderr
    assert "started a local worker" in first.stderr and "started a local worker" not in second.stderr
    exports = sorted((tmp_path / "out").glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
    records = [[json.loads(line) for line in path.read_text().splitlines()] for path in exports]
    assert len(records) == 2 and all(len(r) == 3 for r in records)
    assert [r["job_id"] for r in records[0]] == [r["job_id"] for r in records[1]]
    assert all(r["state"] == "done" and isinstance(r["result"]["json"]["parties"], list) for r in records[1])


def test_run_exits_1_when_a_job_failed(settings, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.txt").write_bytes(b"")
    env = {**os.environ, **settings.to_env()}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "run", str(folder), "--task", "summarize",
                           "--out-dir", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "empty_file" in done.stdout


def test_submit_wait_prints_the_batch_id_and_exits_1_when_a_job_failed(module_settings, module_worker, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "nda.md").write_text("Mutual NDA between Acme Corp and Globex Ltd, effective 1 May 2024, two years.")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "escape.txt").symlink_to(tmp_path / "elsewhere.txt")
    (tmp_path / "elsewhere.txt").write_text("outside the submitted folder")
    env = {**os.environ, **module_settings.to_env()}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(folder), "--task", "summarize",
                           "--wait", "--label", "cli test", "--priority", "9"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    batch_id = done.stdout.strip().splitlines()[0]
    assert "rejected mixed/escape.txt: symlink_escape: symlink leaves the submitted folder" in done.stderr
    store = Store(module_settings.effective_database_url)
    assert store.get_batch(batch_id).label == "cli test"
    states = {r.name: (r.state, r.error_code) for r in batch_records(store, batch_id)}
    assert states == {"mixed/empty.txt": (JobState.FAILED, "empty_file"), "mixed/nda.md": (JobState.DONE, None),
                      "mixed/escape.txt": (JobState.FAILED, "symlink_escape")}
    store.close()
