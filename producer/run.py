"""`docbatch run`: the whole pipeline on one machine in one command.

Uses the configured Redis when it answers, else an embedded one; submits; starts a local worker (GPU if
present, else CPU) when the batch has work left (not when every job is already done); shows progress;
writes `./docbatch-results/BATCH.jsonl` (and, for an OpenAI Batch input, `BATCH.openai.jsonl` in its output
format); stops what it started.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rich.console import Console

from producer.service.embedded import redis_for
from producer.results.export import batch_records, render
from producer.results.progress import wait_for_batch
from producer.service.top_data import engines_tokens_out
from producer.intake.submit import Source, Submission, submit
from schemas.messages import make_celery
from schemas.records import BatchStatus, JobRecord
from schemas.settings import Settings
from schemas.sql.store import Store
from schemas.tasks import TaskDefinition

WORKER_STOP_TIMEOUT_S = 60


@dataclass(frozen=True)
class RunOutcome:
    submission: Submission
    status: BatchStatus
    records: list[JobRecord]
    results_path: Path


class LocalWorker:
    """`docbatch worker` as a child process whose output goes to a log file."""

    def __init__(self, settings: Settings, gpus: str, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self._process = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", gpus],
                                         env={**os.environ, **settings.to_env()},
                                         stdout=self._log, stderr=subprocess.STDOUT)

    def check_alive(self) -> None:
        code = self._process.poll()
        if code is not None:
            raise RuntimeError(f"the local worker exited with code {code}; see {self.log_path}")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()


@contextlib.contextmanager
def local_worker(settings: Settings, gpus: str) -> Iterator[LocalWorker]:
    worker = LocalWorker(settings, gpus, settings.home / "logs" / "worker.log")
    try:
        yield worker
    finally:
        worker.stop()


def run(settings: Settings, source: Source, task: TaskDefinition, *, gpus: str = "auto",
        out_dir: Path = Path("docbatch-results"), label: str | None = None,
        console: Console | None = None) -> RunOutcome:
    """Run `task` over the inputs of `source` end to end on this machine and export the results."""
    console = console or Console(stderr=True)
    store = Store(settings.effective_database_url, settings.blob_dir)
    store.migrate()
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_for(settings.broker_url, console))
        settings = settings.model_copy(update={"broker_url": url})
        app = make_celery(settings)
        submission = submit(settings, store, app, source, task, label=label, console=console)
        batch, rejects = submission.batch, len(submission.collected.rejects)
        # counted as progress counts them: jobs, and the files rejected at submit as failed ones
        console.print(f"batch {batch.batch_id}: {batch.num_jobs + rejects} to finish: {batch.num_jobs} jobs "
                      f"({batch.num_reused_done} already done, {len(batch.to_enqueue)} queued)"
                      + (f" and {rejects} files rejected at submit (failed)" if rejects else ""), highlight=False)
        watch = {"workers_tokens_out": lambda: engines_tokens_out(app)}
        if any(not state.is_terminal for state in store.batch_counts(batch.batch_id)):
            worker = stack.enter_context(local_worker(settings, gpus))
            console.print(f"started a local worker (model {settings.model}); its log: {worker.log_path}")
            watch["check_alive"] = worker.check_alive
        status = wait_for_batch(store, batch.batch_id, console=console, **watch)
    records = batch_records(store, batch.batch_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / f"{batch.batch_id}.jsonl"
    results_path.write_text(render(records, "jsonl"), encoding="utf-8")
    if source.openai_batch is not None:
        results_path = out_dir / f"{batch.batch_id}.openai.jsonl"
        results_path.write_text(render(records, "openai"), encoding="utf-8")
    store.close()
    return RunOutcome(submission, status, records, results_path)
