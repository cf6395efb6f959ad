"""`docbatch run` stopped by a signal mid-batch, as `timeout`, a scheduler or systemd stop it: nothing it started
outlives it, the results finished by then are written, and it exits 128 + the signal's number."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from services import wait_for

from producer.service.embedded import free_port
from schemas.settings import Settings
from schemas.sql.store import Store
from schemas.states import JobState

pytestmark = pytest.mark.slow
NUM_DOCUMENTS = 12
# Free text, every answer exactly this long (EOS ignored), one request at a time: the jobs end one by one, and the
# worker holds all of them, so that its warm shutdown alone would run the rest of the batch, longer than run's grace.
ANSWER_TASK = 'name = "answer"\nprompt = """{{ text }}\n\nSay what this is."""\n\n[generation]\nmax_new_tokens = 48\n'


def descendants(pid: int) -> set[int]:
    """The living processes under `pid` (children, theirs, ...), read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_mid_batch_stops_the_whole_tree_writes_the_finished_results_and_exits_143(tmp_path,
                                                                                          small_model_dir):
    # Given a folder of short documents, no Redis at the configured URL (so run starts one), and a worker that holds
    # every job and runs one at a time
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(NUM_DOCUMENTS):
        (folder / f"note{i:02d}.txt").write_text(f"Note {i}: Acme Corp pays Globex Ltd {100 + i} EUR by 1 May.\n")
    (tmp_path / "answer.toml").write_text(ANSWER_TASK)
    settings = Settings(home=tmp_path / "home", broker_url=f"redis://127.0.0.1:{free_port()}/0",
                        model=str(small_model_dir), device="cpu", max_batch_size=1, max_inflight=NUM_DOCUMENTS,
                        ignore_eos=True, prepare_concurrency=1, metrics_port=0)
    store = Store(settings.effective_database_url)
    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen([sys.executable, "-m", "producer.cli", "run", str(folder), "--task-file",
                                str(tmp_path / "answer.toml"), "--out-dir", str(tmp_path / "out")],
                               env={**os.environ, **settings.to_env()}, stdout=log, stderr=subprocess.STDOUT)
    try:
        # When the first answer is stored, SIGTERM goes to `run` alone (as `timeout` sends it)
        def first_done() -> bool:
            output = (tmp_path / "run.log").read_text()
            assert run.poll() is None, output[-3000:]
            if "started a local worker" not in output:  # the batch is not recorded yet
                return False
            return store.batch_counts(store.latest_batch_ids(1)[0]).get(JobState.DONE, 0) > 0

        wait_for(first_done, "the first answer", timeout_s=300, every_s=0.2)
        tree = descendants(run.pid)
        run.send_signal(signal.SIGTERM)
        code = run.wait(120)
    finally:
        if run.poll() is None:
            run.kill()
    output = (tmp_path / "run.log").read_text()

    # Then it exits 143, and no process of its tree (the embedded Redis, the worker's launcher, its infer and
    # prepare processes and their pool) is left
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert len(tree) >= 4, tree  # Redis, launcher, infer, prepare (and its pool's child)
    assert [pid for pid in tree if is_alive(pid)] == []
    # ... and the results file holds every job, the finished ones with their answers, as the store has them
    batch_id = store.latest_batch_ids(1)[0]
    records = [json.loads(line) for line in (tmp_path / "out" / f"{batch_id}.jsonl").read_text().splitlines()]
    assert len(records) == NUM_DOCUMENTS
    done = {r["job_id"] for r in records if r["state"] == "done"}
    assert all(r["result"]["text"] for r in records if r["state"] == "done")
    stored = store.batch_counts(batch_id)
    assert len(done) == stored.get(JobState.DONE, 0) >= 1
    # ... and the worker did not finish the batch in its warm shutdown: it was killed after run's grace
    assert len(done) < NUM_DOCUMENTS
    assert "SIGTERM: stopping the local worker" in output and "stopped by SIGTERM" in output
    store.close()
