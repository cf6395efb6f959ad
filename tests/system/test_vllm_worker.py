"""The vLLM engine in a real worker (vLLM's CPU build, the packaged model): `DOCBATCH_ENGINE=vllm docbatch run` answers
a folder of documents, and a worker whose vLLM engine core dies ends its infer process for the supervisor to restart."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from conftest import PARTIES_TASK_FILE, worker_process
from services import wait_for

pytestmark = pytest.mark.slow
CONTRACTS = {
    "msa.txt": "Master services agreement between Northwind Analytics Ltd and Harbour Freight plc, 1 March 2024.",
    "nda.md": "# Mutual NDA\n\nAcme Corp and Globex Ltd keep each other's information secret for two years.",
    "lease.txt": "Office lease between Riverside Properties LLC (landlord) and Bluebird Studio Inc (tenant), Austin.",
}


def test_run_with_the_vllm_engine_answers_a_folder_of_documents(settings, tmp_path):
    # Given three contracts and an empty file, and the engine set to vLLM
    folder = tmp_path / "contracts"
    folder.mkdir()
    for name, text in CONTRACTS.items():
        (folder / name).write_text(text)
    (folder / "empty.txt").write_bytes(b"")
    env = {**os.environ, **settings.to_env(), "DOCBATCH_ENGINE": "vllm"}

    # When `docbatch run` takes the folder with a task of short answers
    done = subprocess.run([sys.executable, "-m", "producer.cli", "run", str(folder), "--task-file",
                           str(PARTIES_TASK_FILE), "--out-dir", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=900)

    # Then the contracts are answered by vLLM, the empty file fails alone with its reason, and run exits 1 for it
    assert done.returncode == 1, done.stderr[-3000:]
    records = {r["name"]: r for path in (tmp_path / "out").glob("*.jsonl")
               for r in map(json.loads, path.read_text().splitlines())}
    assert records["contracts/empty.txt"]["error_code"] == "empty_file"
    answered = [records[f"contracts/{name}"] for name in CONTRACTS]
    assert all(r["state"] == "done" and isinstance(r["result"]["json"]["parties"], list) for r in answered)
    assert all(r["tokens_out"] > 0 and r["batch_size"] >= 1 for r in answered)
    log = (settings.home / "logs" / "worker.log").read_text()
    assert "VllmEngine engine" in log and "vLLM engine: KV cache" in log


def test_a_worker_whose_vllm_engine_core_dies_ends_its_infer_process(settings, tmp_path):
    # Given a worker whose infer process runs the vLLM engine
    log_path = tmp_path / "worker.log"
    with worker_process(settings.model_copy(update={"engine": "vllm"}), log_path) as worker:
        wait_for(lambda: "VllmEngine engine" in log_path.read_text(), "the vLLM engine to start", timeout_s=600)
        tree = psutil.Process(worker.pid).children(recursive=True)
        # its command line, or the title Celery gives it where setproctitle is installed (vLLM brings it)
        infer = [p for p in tree if "infer cpu@" in " ".join(p.cmdline())]
        core = [p for p in infer[0].children(recursive=True)]
        assert len(infer) == 1 and core

        # When vLLM's engine core process is killed
        for process in core:
            process.send_signal(signal.SIGKILL)

        # Then the infer process exits with code 70 at once, and the supervisor starts a fresh one
        wait_for(lambda: "exited with code 70; restarting" in log_path.read_text(), "the infer process to exit",
                 timeout_s=120)
        assert not infer[0].is_running() or infer[0].status() == psutil.STATUS_ZOMBIE
