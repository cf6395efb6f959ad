"""Inbox scans with their real parts: a Redis server of this module's own (the lock, the queues), a SQLite
store, real files. No worker runs here: where a test needs a job to have ended it ends it through the
store, as a worker would (`test_service.py` runs the whole path, beat and worker processes included)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from producer.service.embedded import embedded_redis
from producer.service.inbox import Scanner
from producer.service.top_data import queue_lengths
from schemas.inboxes import InboxConfig
from schemas.sql.lifecycle import Holder
from schemas.messages import PREPARE_QUEUE, make_celery
from schemas.settings import Settings
from schemas.states import ErrorCode, JobState
from schemas.sql.store import Store

LONG_AGO_S = 3600


@pytest.fixture(scope="module")
def module_redis_url():
    with embedded_redis() as url:
        yield url


@pytest.fixture
def inbox_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


def make_settings(tmp_path: Path, redis_url: str, inbox_folder: Path, **inbox: object) -> Settings:
    config = {"name": "contracts", "folder": inbox_folder, "task": "summarize", "every_s": 1, "settle_s": 1, **inbox}
    return Settings(home=tmp_path / "home", broker_url=redis_url, inbox=(InboxConfig(**config),))


@pytest.fixture
def scanner(tmp_path, module_redis_url, inbox_folder, request) -> Scanner:
    redis.Redis.from_url(module_redis_url).flushdb()
    settings = make_settings(tmp_path, module_redis_url, inbox_folder, **getattr(request, "param", {}))
    store = Store(settings.effective_database_url)
    store.migrate()
    yield Scanner(settings, store, make_celery(settings), redis.Redis.from_url(module_redis_url))
    store.close()


def settled_file(folder: Path, name: str, text: str) -> Path:
    """A file whose last write was long ago."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (time.time() - LONG_AGO_S, time.time() - LONG_AGO_S))
    return path


def batch_names(store: Store, batch_id: str) -> list[str]:
    return [item.name for item, _, _ in store.batch_rows(batch_id)]


def test_settled_files_make_one_batch_and_a_tick_with_nothing_new_makes_none(scanner, inbox_folder):
    # Given an inbox with three settled files
    for i in range(3):
        settled_file(inbox_folder, f"c{i}.txt", f"Agreement number {i} between Acme and Globex.")
    inbox = scanner.settings.inbox[0]

    # When it is scanned twice
    first = scanner.tick(inbox)
    second = scanner.tick(inbox)

    # Then the first tick made one labelled batch of the three files and sent their jobs; the second made none
    assert first.error is None and first.batch_id is not None
    assert batch_names(scanner.store, first.batch_id) == ["inbox/c0.txt", "inbox/c1.txt", "inbox/c2.txt"]
    assert scanner.store.get_batch(first.batch_id).label == "inbox:contracts"
    assert queue_lengths(scanner.redis)[PREPARE_QUEUE] == 3
    assert second.batch_id is None and second.taken == [] and second.waiting == 3
    assert scanner.store.latest_batch_ids() == [first.batch_id]


def test_a_file_still_being_written_is_taken_only_once_it_has_settled(scanner, inbox_folder):
    # Given a file that a writer appends to while the inbox is scanned
    path = inbox_folder / "growing.txt"
    path.write_text("Lease between Alpha SA and Beta AG.")
    stop = threading.Event()

    def write() -> None:
        with open(path, "a") as f:
            while not stop.is_set():
                f.write(" More clauses.")
                f.flush()
                time.sleep(0.05)

    writer = threading.Thread(target=write)
    writer.start()
    inbox = scanner.settings.inbox[0]
    try:
        during = scanner.tick(inbox)
    finally:
        stop.set()
        writer.join()

    # Then the tick during the writes took nothing
    assert (during.unsettled, during.taken, during.batch_id) == (1, [], None)
    # When the file stays unchanged for settle_s, a later tick takes it, whole
    deadline = time.monotonic() + 30
    report = scanner.tick(inbox)
    while report.batch_id is None and time.monotonic() < deadline:
        time.sleep(0.2)
        report = scanner.tick(inbox)
    assert report.taken == ["inbox/growing.txt"]
    (_, job, _), = scanner.store.batch_rows(report.batch_id)
    assert scanner.store.read_document(job.document_sha256)[0] == path.read_bytes()


def test_a_scan_skips_its_tick_while_another_holds_the_inbox_lock(scanner, inbox_folder):
    settled_file(inbox_folder, "a.txt", "Agreement A.")
    inbox = scanner.settings.inbox[0]
    other = scanner.redis.lock("docbatch:inbox:contracts:lock", timeout=60)
    assert other.acquire(blocking=False)
    try:
        held = scanner.tick(inbox)
    finally:
        other.release()
    assert held.skipped == "another scan of this inbox is running" and held.batch_id is None
    assert scanner.tick(inbox).taken == ["inbox/a.txt"]


def test_overlapping_ticks_in_threads_and_in_two_processes_take_each_file_once(scanner, inbox_folder, tmp_path):
    # Given 40 settled files, and two more scanners of the same inbox in other threads, with their own connections
    for i in range(40):
        settled_file(inbox_folder, f"d{i:02d}.txt", f"Document {i}.")
    inbox, settings = scanner.settings.inbox[0], scanner.settings
    others = [Scanner(settings, Store(settings.effective_database_url), make_celery(settings),
                      redis.Redis.from_url(settings.broker_url)) for _ in range(2)]
    # When the three scan at once
    threads = [threading.Thread(target=s.tick, args=(inbox,)) for s in [scanner, *others]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # ... and then two `docbatch inbox scan` processes at once, after three more files arrived
    for i in range(3):
        settled_file(inbox_folder, f"e{i}.txt", f"Late document {i}.")
    env = {**os.environ, **settings.to_env()}
    scans = [subprocess.Popen([sys.executable, "-m", "producer.cli", "inbox", "scan"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [scan.communicate(timeout=120) for scan in scans]
    assert [scan.returncode for scan in scans] == [0, 0], [err[-2000:] for _, err in outputs]

    # Then every file is in exactly one batch, and there is one job per file
    names = [name for batch_id in scanner.store.latest_batch_ids() for name in batch_names(scanner.store, batch_id)]
    assert sorted(names) == sorted(f"inbox/{p.name}" for p in inbox_folder.iterdir())
    assert len(scanner.store.latest_batch_ids()) == 2
    assert queue_lengths(scanner.redis)[PREPARE_QUEUE] == 43


WORKER = Holder("test@h", "test@h/1", 60)


def end_jobs(store: Store, batch_id: str, failing: set[str]) -> None:
    """End each job of the batch as a worker would: done, or failed for the names in `failing`."""
    for item, job, _ in store.batch_rows(batch_id):
        store.claim(job.id, JobState.QUEUED, JobState.PREPARING, WORKER)
        if item.name in failing:
            store.fail(job.id, ErrorCode.EMPTY_FILE, "the file is empty", holder=WORKER)
            continue
        store.mark_ready(job.id, WORKER)
        store.claim(job.id, JobState.READY, JobState.RUNNING, WORKER, count_attempt=True)
        store.finish(job.id, {"text": "ok"}, "ok", tokens_in=1, tokens_out=1, batch_size=1, holder=WORKER)


@pytest.mark.parametrize("scanner, expected", [
    ({"after": "move"}, {"processed/sub/good.txt", "failed/bad.txt"}),
    ({"after": "delete"}, {"failed/bad.txt"}),
    ({"after": "leave"}, {"inbox/sub/good.txt", "inbox/bad.txt"}),
], indirect=["scanner"])
def test_files_are_moved_or_deleted_by_outcome_only_once_their_jobs_end(scanner, inbox_folder, tmp_path, expected):
    settled_file(inbox_folder, "sub/good.txt", "A good agreement.")
    settled_file(inbox_folder, "bad.txt", "A document that will fail.")
    inbox = scanner.settings.inbox[0]
    batch_id = scanner.tick(inbox).batch_id
    # While the jobs run, the files stay where they are
    assert scanner.tick(inbox).waiting == 2
    assert {"good.txt", "bad.txt"} <= {p.name for p in inbox_folder.rglob("*")}

    # When the jobs end, one done and one failed
    end_jobs(scanner.store, batch_id, failing={"inbox/bad.txt"})
    report = scanner.tick(inbox)

    # Then each file went where `after` says, and no new batch was made
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.txt")}
    assert files == expected
    assert report.batch_id is None and scanner.store.latest_batch_ids() == [batch_id]


def test_a_failed_ingestion_leaves_every_file_in_place_and_says_why(tmp_path, module_redis_url, inbox_folder,
                                                                    caplog):
    settings = make_settings(tmp_path, module_redis_url, inbox_folder, task=None,
                             task_file=tmp_path / "missing_task.toml")
    store = Store(settings.effective_database_url)
    store.migrate()
    scanner = Scanner(settings, store, make_celery(settings), redis.Redis.from_url(module_redis_url))
    path = settled_file(inbox_folder, "a.txt", "Agreement A.")

    report = scanner.tick(settings.inbox[0])

    assert report.error is not None and "missing_task.toml" in report.error
    assert path.exists() and store.latest_batch_ids() == []
    assert any("every file stays where it is" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    store.close()


def test_a_file_that_cannot_be_moved_stays_and_the_others_go_on(tmp_path, module_redis_url, inbox_folder, caplog):
    # Given done files whose processed/ folder cannot be made (a file is in its way)
    (tmp_path / "blocked").write_text("not a folder")
    settings = make_settings(tmp_path, module_redis_url, inbox_folder, processed_dir=tmp_path / "blocked" / "done")
    store = Store(settings.effective_database_url)
    store.migrate()
    scanner = Scanner(settings, store, make_celery(settings), redis.Redis.from_url(module_redis_url))
    settled_file(inbox_folder, "good.txt", "A good agreement.")
    settled_file(inbox_folder, "bad.txt", "A document that will fail.")
    inbox = settings.inbox[0]
    end_jobs(store, scanner.tick(inbox).batch_id, failing={"inbox/bad.txt"})

    report = scanner.tick(inbox)

    # Then the done file stays with a clear log line, and the failed one still went to failed/
    assert report.error is None and report.disposed == {"failed_to_move": 1, "moved_failed": 1}
    assert (inbox_folder / "good.txt").exists() and (tmp_path / "failed" / "bad.txt").exists()
    assert any("cannot apply after=move to" in r.getMessage() for r in caplog.records)
    store.close()
