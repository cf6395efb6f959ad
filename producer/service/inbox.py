"""One scan ("tick") of an inbox: take the files that have settled and are new, make one batch of them, and
move or delete the files whose jobs have ended.

- **Settled**: a file is taken once its modification time is `settle_s` old and its size and mtime do not
  change while it is read; a file still being written waits for a later tick.
- **New**: the inbox's own batches (label `inbox:NAME`) are its ledger. A file whose content a batch of
  this inbox already lists is never taken again, so overlapping ticks, a restarted beat or a second beat
  process make no second job, and a tick that finds nothing new makes no batch. A Redis lock per inbox
  keeps two scans of one inbox from running at once (the second one skips its tick).
- **After**: once every job of a taken file's content has ended, the file is left (`leave`), moved to
  `processed/` or `failed/` beside the inbox (`move`), or deleted if done (`delete`; a failed one is
  moved). A file is never moved or deleted before that; an ingestion that fails leaves every file where
  it is, logs why, and the next tick tries again.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery

from producer.service.inbox_status import save_report
from producer.intake.submit import BrokerUnreachable, Collected, submit
from producer.intake.walk import Found, walk
from schemas.inboxes import InboxConfig
from schemas.sql.ledger import taken_documents
from schemas.settings import Settings
from schemas.states import JobState
from schemas.sql.store import Store
from schemas.tasks import TaskDefinition, builtin_task, load_task_file
from worker.documents.extract import sniff

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 600  # a scan holds its inbox's lock at most this long (a beat that died frees it then)


@dataclass
class ScanReport:
    """What one tick saw and did; `inbox list` shows the last one."""

    inbox: str
    started_at: float  # epoch seconds
    seen: int = 0  # regular files in the folder
    unsettled: int = 0  # still being written
    waiting: int = 0  # taken earlier, their jobs not ended yet
    taken: list[str] = field(default_factory=list)
    batch_id: str | None = None
    disposed: dict[str, int] = field(default_factory=dict)  # moved_done, moved_failed, deleted
    skipped: str | None = None  # why the tick did nothing (another scan held the lock, no folder)
    error: str | None = None


@dataclass(frozen=True)
class Candidate:
    found: Found
    sha256: str


@dataclass
class Scanner:
    """Everything a tick needs, made once per beat process and shared by its ticks."""

    settings: Settings
    store: Store
    app: Celery
    redis: redis.Redis
    # inbox name -> {(path, size, mtime_ns, inode): sha256} of the files its last tick saw
    _hashes: dict[str, dict[tuple, str]] = field(default_factory=dict)

    def tick(self, inbox: InboxConfig) -> ScanReport:
        """Scan `inbox` once under its lock, and record the report where `inbox list` reads it."""
        report = ScanReport(inbox.name, time.time())
        lock = self.redis.lock(f"docbatch:inbox:{inbox.name}:lock", timeout=LOCK_TIMEOUT_S)
        try:
            if not lock.acquire(blocking=False):
                report.skipped = "another scan of this inbox is running"
                log.info("inbox %s: %s; this tick does nothing", inbox.name, report.skipped)
                return report
            try:
                self._scan(inbox, report)
            finally:
                lock.release()
        except BrokerUnreachable as e:
            report.batch_id, report.error = e.submission.batch.batch_id, f"Redis unreachable: {e.reason}"
            log.error("inbox %s: batch %s is recorded but Redis did not take its jobs (%s); its files stay in place "
                      "until a prepare worker's reconciler has sent and run them", inbox.name, report.batch_id,
                      e.reason)
        except Exception as e:  # noqa: BLE001 - a failed tick leaves the files in place; the next one retries
            report.error = f"{type(e).__name__}: {e}"
            log.error("inbox %s: the scan failed (%s); every file stays where it is and the next tick tries "
                      "again", inbox.name, report.error, exc_info=not isinstance(e, (OSError, redis.RedisError)))
        save_report(self.redis, report)
        return report

    def _scan(self, inbox: InboxConfig, report: ScanReport) -> None:
        if not inbox.folder.is_dir():
            report.skipped = f"no folder {inbox.folder}"
            log.warning("inbox %s: %s", inbox.name, report.skipped)
            return
        candidates = self._settled(inbox, walk([inbox.folder]).found, report)
        taken = taken_documents(self.store, inbox.batch_label, {c.sha256 for c in candidates})
        new = []
        for candidate in candidates:
            state = taken.get(candidate.sha256)
            if state is None:
                new.append(candidate)
            elif state.is_terminal:
                try:
                    disposition = dispose(inbox, candidate.found.path, candidate.sha256, state)
                except OSError as e:  # this file stays; the others go on
                    log.error("inbox %s: cannot apply after=%s to %s: %s; it stays, and the next tick tries again",
                              inbox.name, inbox.after, candidate.found.path, e)
                    disposition = "failed_to_move"
                report.disposed[disposition] = report.disposed.get(disposition, 0) + 1
            else:
                report.waiting += 1
        if new:
            self._ingest(inbox, new, report)

    def _settled(self, inbox: InboxConfig, found: list[Found], report: ScanReport) -> list[Candidate]:
        """The files unchanged for `settle_s` and while read, with their content hashes."""
        report.seen = len(found)
        known, hashes, candidates = self._hashes.get(inbox.name, {}), {}, []
        now = time.time()
        for item in found:
            try:
                before = item.path.stat()
                if now - before.st_mtime < inbox.settle_s:
                    report.unsettled += 1
                    continue
                key = (str(item.path), before.st_size, before.st_mtime_ns, before.st_ino)
                sha = known.get(key) or _sha256(item.path)
                after = item.path.stat()
            except OSError as e:  # gone or unreadable since the walk: nothing to take
                log.info("inbox file %s: %s; passed over this tick", item.path, e.strerror)
                continue
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                report.unsettled += 1  # written to while we read it
                continue
            hashes[key] = sha
            candidates.append(Candidate(item, sha))
        self._hashes[inbox.name] = hashes  # only what is still there
        return candidates

    def _ingest(self, inbox: InboxConfig, new: list[Candidate], report: ScanReport) -> None:
        task = inbox_task(inbox, self.settings)
        collected = store_new_files(new, self.settings.max_file_bytes, self.store)
        if not collected.items:
            return
        submission = submit(self.settings, self.store, self.app, Stored(collected), task, priority=inbox.priority,
                            label=inbox.batch_label)
        report.taken = [item for item, _ in submission.collected.items]
        report.batch_id = submission.batch.batch_id
        log.info("inbox %s: took %d files into batch %s (%d jobs, %d already done)", inbox.name, len(report.taken),
                 report.batch_id, submission.batch.num_jobs, submission.batch.num_reused_done)


def inbox_task(inbox: InboxConfig, settings: Settings) -> TaskDefinition:
    """The inbox's task definition (a task file is read at every tick, so an edit applies to new files)."""
    if inbox.task_file is not None:
        return load_task_file(inbox.task_file, settings)
    return builtin_task(inbox.task, settings)


def store_new_files(candidates: list[Candidate], max_file_bytes: int, store: Store) -> Collected:
    """Read each new file again and store it; one that changed since it was hashed, or is too large, stays in
    place (a changed one is seen again at the next tick)."""
    items, num_new = [], 0
    for candidate in candidates:
        if candidate.found.size_bytes > max_file_bytes:
            log.warning("inbox file %s: %d bytes, over max_file_bytes (%d); left in place", candidate.found.path,
                        candidate.found.size_bytes, max_file_bytes)
            continue
        data = candidate.found.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != candidate.sha256:
            log.info("inbox file %s changed while it was read; taken at a later tick", candidate.found.path)
            continue
        num_new += store.put_document(candidate.sha256, data, sniff(data))
        items.append((candidate.found.name, candidate.sha256))
    return Collected(items, [], len(candidates), num_new)


@dataclass(frozen=True)
class Stored:
    """Files already stored, as `submit` takes its inputs."""

    collected: Collected
    openai_batch = None  # not an OpenAI Batch file

    def collect(self, *_) -> Collected:
        return self.collected


def dispose(inbox: InboxConfig, path: Path, sha256: str, state: JobState) -> str:
    """Apply the inbox's `after` to a file whose jobs have all ended; returns what was done."""
    done = state == JobState.DONE
    if inbox.after == "leave":
        return "left"
    if inbox.after == "delete" and done:
        path.unlink()
        log.info("inbox %s: %s done; deleted", inbox.name, path)
        return "deleted"
    target_folder = inbox.done_folder if done else inbox.failed_folder
    target = _free_target(target_folder / path.relative_to(inbox.folder), sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    log.info("inbox %s: %s %s; moved to %s", inbox.name, path, state.value, target)
    return "moved_done" if done else "moved_failed"


def _free_target(target: Path, sha256: str) -> Path:
    """`target`, or beside it with the content's hash in the name when another file is there already."""
    return target if not target.exists() else target.with_name(f"{target.stem}.{sha256[:12]}{target.suffix}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
