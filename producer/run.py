"""`docbatch run`: the whole pipeline on one machine in one command.

Uses the configured Redis when it answers, else an embedded one; submits; starts a local worker (GPU if
present, else CPU) when the batch has work left (not when every job is already done); shows progress;
writes `./docbatch-results/BATCH.jsonl` (and, for an OpenAI Batch input, `BATCH.openai.jsonl` in its output
format); stops what it started. `docbatch demo` runs its two batches through one `LocalPipeline`: one worker
answers both.
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


class LocalPipeline:
    """Batches run on this machine: the store, Redis (embedded if none answers) and one local worker, started when
    the first batch with work left is submitted and kept for the batches after it."""

    def __init__(self, settings: Settings, gpus: str, console: Console, stack: contextlib.ExitStack) -> None:
        self.store = Store(settings.effective_database_url, settings.blob_dir)
        self.store.migrate()
        stack.callback(self.store.close)
        url = stack.enter_context(redis_for(settings.broker_url, console))
        self.settings = settings.model_copy(update={"broker_url": url})
        self.app = make_celery(self.settings)
        self.console = console
        self._gpus, self._stack = gpus, stack
        self._watch = {"workers_tokens_out": lambda: engines_tokens_out(self.app)}

    def submit(self, source: Source, task: TaskDefinition, label: str | None = None) -> Submission:
        """Submit the inputs of `source`; the local worker starts if this batch has work left and none runs yet."""
        submission = submit(self.settings, self.store, self.app, source, task, label=label, console=self.console)
        batch, rejects = submission.batch, len(submission.collected.rejects)
        # counted as progress counts them: jobs, and the files rejected at submit as failed ones
        self.console.print(f"batch {batch.batch_id}: {batch.num_jobs + rejects} to finish: {batch.num_jobs} jobs "
                           f"({batch.num_reused_done} already done, {len(batch.to_enqueue)} queued)"
                           + (f" and {rejects} files rejected at submit (failed)" if rejects else ""),
                           highlight=False)
        if "check_alive" not in self._watch and any(
                not state.is_terminal for state in self.store.batch_counts(batch.batch_id)):
            worker = self._stack.enter_context(local_worker(self.settings, self._gpus))
            self.console.print(f"started a local worker (model {self.settings.model}); its log: {worker.log_path}")
            self._watch["check_alive"] = worker.check_alive
        return submission

    def finish(self, submission: Submission, out_dir: Path, openai_batch: bool = False) -> RunOutcome:
        """Wait for the batch to finish and export its results to OUT_DIR/BATCH.jsonl (and, for an OpenAI Batch
        input, OUT_DIR/BATCH.openai.jsonl)."""
        batch_id = submission.batch.batch_id
        status = wait_for_batch(self.store, batch_id, console=self.console, **self._watch)
        records = batch_records(self.store, batch_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        results_path = out_dir / f"{batch_id}.jsonl"
        results_path.write_text(render(records, "jsonl"), encoding="utf-8")
        if openai_batch:
            results_path = out_dir / f"{batch_id}.openai.jsonl"
            results_path.write_text(render(records, "openai"), encoding="utf-8")
        return RunOutcome(submission, status, records, results_path)


@contextlib.contextmanager
def local_pipeline(settings: Settings, gpus: str = "auto", console: Console | None = None) -> Iterator[LocalPipeline]:
    """A `LocalPipeline`; what it started (the worker, an embedded Redis) stops on leaving."""
    with contextlib.ExitStack() as stack:
        yield LocalPipeline(settings, gpus, console or Console(stderr=True), stack)


def run(settings: Settings, source: Source, task: TaskDefinition, *, gpus: str = "auto",
        out_dir: Path = Path("docbatch-results"), label: str | None = None,
        console: Console | None = None) -> RunOutcome:
    """Run `task` over the inputs of `source` end to end on this machine and export the results."""
    with local_pipeline(settings, gpus, console) as pipeline:
        submission = pipeline.submit(source, task, label)
        return pipeline.finish(submission, out_dir, openai_batch=source.openai_batch is not None)
