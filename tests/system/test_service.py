"""docbatch as a service, with its real parts: one `docbatch worker` (CPU, the small model), `docbatch beat`
scanning an inbox, Flower over HTTP, Celery's own command line, the workers' metrics endpoints and
`docbatch top`, all on a Redis server of this module's own and a SQLite store. The processes are started
once for the module; the tests run in file order, each building on what the ones before did."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import worker_process
from services import FLOWER_PASSWORD, FLOWER_USER, HOST, flower_get, wait_for
from producer.cli import main as cli
from producer.service.embedded import embedded_redis, free_port
from producer.service.top_data import parse_metrics, total
from schemas.inboxes import InboxConfig
from schemas.settings import Settings
from schemas.sql.store import Store

pytestmark = pytest.mark.slow
TASK_FILE = """name = "gist"
prompt = "In one short sentence, what is this document?\\n\\n{{ text }}"

[generation]
max_new_tokens = 12
"""


def two_free_ports() -> int:
    """A port p with p + 1 free too (the worker's infer and prepare processes take one each)."""
    while True:
        port = free_port()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port


@pytest.fixture(scope="module")
def service(tmp_path_factory, small_model_dir):
    """Settings, an inbox folder, and a running worker and Flower, for the whole module."""
    root = tmp_path_factory.mktemp("service")
    (root / "inbox").mkdir()
    (root / "gist.toml").write_text(TASK_FILE)
    with embedded_redis() as broker_url:
        settings = Settings(
            home=root / "home", broker_url=broker_url, model=str(small_model_dir), device="cpu", max_batch_size=8,
            max_wait_ms=300, prepare_concurrency=2, metrics_port=two_free_ports(), flower_port=free_port(),
            flower_user=FLOWER_USER, flower_password=FLOWER_PASSWORD, alert_interval_s=0.5,
            alert_failure_min_jobs=3, alert_failure_rate=0.5,
            inbox=(InboxConfig(name="docs", folder=root / "inbox", task_file=root / "gist.toml", every_s=1,
                               settle_s=1),))
        Store(settings.effective_database_url).migrate()
        env = {**os.environ, **settings.to_env()}
        with open(root / "flower.log", "wb") as flower_log, worker_process(settings, root / "worker.log") as worker:
            flower = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower", "--read-only"], env=env,
                                      cwd=root, stdout=flower_log, stderr=subprocess.STDOUT)
            try:
                yield settings, root, worker, env
            finally:
                flower.terminate()
                flower.wait(30)


def scrape(port: int) -> list:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse_metrics(response.read().decode())


def settled(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.utime(path, (time.time() - 60, time.time() - 60))


def test_celery_inspect_ping_reaches_docbatchs_workers_through_the_module_app(service):
    settings, root, worker, env = service
    wait_for(lambda: flower_get(settings, "/api/workers?refresh=1")[0] == 200, "Flower", timeout_s=120)
    done = wait_for(lambda: (lambda r: r if f"cpu@{HOST}" in r.stdout and f"prepare@{HOST}" in r.stdout else None)(
        subprocess.run([sys.executable, "-m", "celery", "-A", "worker.celery_app", "inspect", "ping"], env=env,
                       cwd=root, capture_output=True, text=True, timeout=120)), "both workers to answer ping")
    assert done.stdout.count("pong") == 2


def test_beat_ingests_the_inbox_and_moves_each_file_by_its_outcome(service):
    settings, root, worker, env = service
    # Given a contract and an empty file in the inbox, and `docbatch beat` running
    settled(root / "inbox" / "contract.txt", b"Services agreement between Acme Corp and Globex Ltd, 1 May 2024.")
    settled(root / "inbox" / "empty.txt", b"")
    with open(root / "beat.log", "wb") as log:
        beat = subprocess.Popen([sys.executable, "-m", "producer.cli", "beat"], env=env, cwd=root, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            # Then the contract ends done and goes to processed/, the empty file fails and goes to failed/
            moved = (root / "processed" / "contract.txt", root / "failed" / "empty.txt")
            wait_for(lambda: all(path.exists() for path in moved), "the files to be moved", timeout_s=600)
        finally:
            beat.terminate()
            assert beat.wait(60) == 0
    assert not any((root / "inbox").iterdir())
    store = Store(settings.effective_database_url)
    (batch_id,) = store.latest_batch_ids()
    assert store.get_batch(batch_id).label == "inbox:docs"
    assert {item.name: job.state.value for item, job, _ in store.batch_rows(batch_id)} == {
        "inbox/contract.txt": "done", "inbox/empty.txt": "failed"}
    result = CliRunner().invoke(cli, ["inbox", "list"], env=settings.to_env())
    assert result.exit_code == 0, result.output
    assert "docs" in result.output and "every 1 s" in result.output


def test_each_worker_exports_its_job_counters_and_histograms(service):
    settings, *_ = service
    infer, prepare = scrape(settings.metrics_port), scrape(settings.metrics_port + 1)
    assert total(infer, "docbatch_jobs_done_total", stage="infer") == 1
    assert total(infer, "docbatch_job_batch_size_count") == 1
    assert total(infer, "docbatch_job_run_seconds_count", stage="infer") == 1
    assert total(infer, "docbatch_job_tokens_out_total") >= 1
    assert total(infer, "docbatch_engine_tokens_out_total") >= 1
    assert total(infer, "docbatch_engine_weight_bytes") > 0  # the engine's memory report, set at start
    assert total(infer, "docbatch_engine_kv_capacity_tokens") > 0
    assert total(infer, "docbatch_worker_info", worker=f"cpu@{HOST}", role="infer") == 1
    assert total(infer, "docbatch_gpu_memory_used_bytes") is None  # a CPU worker reads no GPU
    assert total(prepare, "docbatch_jobs_failed_total", stage="prepare", reason="empty_file") == 1
    assert total(prepare, "docbatch_jobs_prepared_total") == 1


def test_a_failure_rate_over_its_threshold_fires_the_alert(service):
    settings, root, worker, env = service
    port = settings.metrics_port + 1
    assert total(scrape(port), "docbatch_alert", alert="failure_rate", subject="worker") is None
    # When two more documents fail (three of the prepare worker's three ended jobs: over 50%)
    folder = root / "broken"
    folder.mkdir()
    for i in range(2):
        (folder / f"broken{i}.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\nendobj " + bytes([48 + i]))
    done = subprocess.run([sys.executable, "-m", "producer.cli", "submit", str(folder), "--task", "summarize",
                           "--wait"], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    # ... (`--wait` into a pipe writes plain progress lines, the last one when the batch has ended)
    assert "2/2 finished (done 0, failed 2, cancelled 0), running 0, pending 0" in done.stderr.splitlines()[-1]
    # Then the prepare worker's alert gauge fires, and its log says why
    wait_for(lambda: total(scrape(port), "docbatch_alert", alert="failure_rate", subject="worker") == 1,
             "the failure_rate alert", timeout_s=60)
    log = (root / "worker.log").read_text()
    assert "ALERT failure_rate (worker): 3 of the 3 jobs ended" in log


def test_flower_asks_for_credentials_and_shows_the_workers_queues_and_named_tasks(service):
    settings, *_ = service
    assert flower_get(settings, "/api/workers", auth=False)[0] == 401
    status, workers = flower_get(settings, "/api/workers?refresh=1")
    assert status == 200
    queues = {name: [q["name"] for q in info["active_queues"]] for name, info in workers.items()}
    assert queues == {f"cpu@{HOST}": ["infer"], f"prepare@{HOST}": ["prepare"]}
    status, lengths = flower_get(settings, "/api/queues/length")
    assert status == 200 and {q["name"] for q in lengths["active_queues"]} == {"infer", "prepare"}
    status, tasks = flower_get(settings, "/api/tasks")
    named = {(task["name"], task["kwargs"]) for task in tasks.values()}
    assert ("docbatch.prepare", "{'name': 'inbox/contract.txt'}") in named
    assert ("docbatch.infer", "{'name': 'inbox/contract.txt'}") in named
    # ... and, started --read-only, it refuses operations
    assert flower_get(settings, f"/api/worker/shutdown/cpu@{HOST}", method="POST")[0] == 403


def test_the_worker_logs_no_pidbox_error_after_flowers_polls(service):
    _, root, *_ = service
    log = (root / "worker.log").read_text()
    assert "celery.worker.pidbox" not in log and "not enough values to unpack" not in log


def test_top_once_shows_the_workers_queues_and_the_inbox_batch(service):
    settings, root, worker, env = service
    done = subprocess.run([sys.executable, "-m", "producer.cli", "top", "--once"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for expected in (f"cpu@{HOST}", f"prepare@{HOST}", "infer", "prepare", "inbox:docs", "gist", "2/2 ✓",
                     "failure_rate(worker)"):
        assert expected in done.stdout, done.stdout


def test_flower_refuses_to_start_open_to_others(service):
    settings, *_ = service
    env = {**settings.to_env(), "DOCBATCH_FLOWER_USER": "", "DOCBATCH_FLOWER_PASSWORD": ""}
    refused = CliRunner().invoke(cli, ["flower"], env=env)
    assert refused.exit_code == 1 and "Flower needs credentials" in refused.output
    refused = CliRunner().invoke(cli, ["flower", "--insecure-local", "--address", "0.0.0.0"], env=env)
    assert refused.exit_code == 1 and "only on loopback" in refused.output
