"""`docbatch run`: the whole pipeline on one machine in one command.

Uses the configured Redis when it answers, else an embedded one; submits; starts a local worker (GPU if
present, else CPU) when the batch has work left (not when every job is already done); shows progress;
writes `./docbatch-results/BATCH.jsonl` (and, for an OpenAI Batch input, `BATCH.openai.jsonl` in its output
format); stops what it started.

A signal (SIGTERM from `timeout`, a scheduler or systemd; SIGHUP when the terminal goes; SIGINT, Ctrl-C) unwinds the
same way: the local worker is stopped (its process group, SIGKILL after `WORKER_STOP_GRACE_S`), an embedded Redis
after it, the results finished by then are written, and the command exits 128 + the signal's number (143 for
SIGTERM). The jobs not finished stay in the store; running the same inputs again finishes them.

`docbatch demo` runs its two batches through one `LocalPipeline`: one worker answers both.
"""
from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rich.console import Console

from producer.service.children import Child, stop_children
from producer.service.embedded import redis_for
from producer.results.export import batch_records, render
from producer.results.progress import batch_status, wait_for_batch
from producer.service.top_data import engines_tokens_out
from producer.intake.submit import Source, Submission, submit
from schemas.messages import make_celery
from schemas.records import BatchStatus, JobRecord
from schemas.settings import Settings
from schemas.sql.store import Store
from schemas.tasks import TaskDefinition

# A worker's warm shutdown finishes every job it holds (max_inflight of them: a whole batch of 512); past this
# grace it is killed, and the jobs it held come back by their leases when the inputs are run again.
WORKER_STOP_GRACE_S = 10
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Stopped(BaseException):
    """`run` was asked to stop by a signal (a BaseException, as KeyboardInterrupt is: no `except Exception` on the
    way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """The stop signals caught while `run` runs, raised as `Stopped` only where `run` can unwind (inside
    `interruptible()`: the submission, the wait); one that comes elsewhere (starting or stopping the worker, writing
    the results) is kept and raised at the next `interruptible()`, so that no clean-up is cut short. Only the first
    signal counts: a second Ctrl-C does not break off the stop under way."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._armed = False

    def _caught(self, signum: int, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            if self._armed:
                raise Stopped(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        previous = {sig: signal.signal(sig, self._caught) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        self._armed = True
        try:
            if self.signum is not None:
                raise Stopped(self.signum)
            yield
        finally:
            self._armed = False


@dataclass(frozen=True)
class RunOutcome:
    submission: Submission
    status: BatchStatus
    records: list[JobRecord]
    results_path: Path
    stopped_by: Stopped | None = None  # the signal that stopped the run before its batch finished


@contextlib.contextmanager
def local_worker(settings: Settings, gpus: str) -> Iterator[Child]:
    """`docbatch worker` as a child in a process group of its own, stopped (the whole group) when the block ends."""
    worker = Child.start("worker", ["worker", "--gpus", gpus], settings)
    try:
        yield worker
    finally:
        stop_children([worker], WORKER_STOP_GRACE_S)


def _check_alive(worker: Child) -> None:
    code = worker.process.poll()
    if code is not None:
        raise RuntimeError(f"the local worker exited with code {code}; see {worker.log_path}")


class LocalPipeline:
    """Batches run on this machine: the store, Redis (embedded if none answers) and one local worker, started when
    the first batch with work left is submitted and kept for the batches after it. A stop signal during a submission
    raises `Stopped`; during a wait, Redis and the worker are stopped, and this and every later `finish` writes what
    was finished by then (see the module's docstring)."""

    def __init__(self, settings: Settings, gpus: str, console: Console, stack: contextlib.ExitStack,
                 signals: StopSignals) -> None:
        self.store = Store(settings.effective_database_url, settings.blob_dir)
        self.store.migrate()
        stack.callback(self.store.close)
        self._services = stack.enter_context(contextlib.ExitStack())  # Redis, the worker: stopped before the store
        url = self._services.enter_context(redis_for(settings.broker_url, console))
        self.settings = settings.model_copy(update={"broker_url": url})
        self.app = make_celery(self.settings)
        self.console, self.signals = console, signals
        self.stopped: Stopped | None = None
        self._gpus = gpus
        self._watch = {"workers_tokens_out": lambda: engines_tokens_out(self.app)}

    def submit(self, source: Source, task: TaskDefinition, label: str | None = None) -> Submission:
        """Submit the inputs of `source`; the local worker starts if this batch has work left and none runs yet."""
        with self.signals.interruptible():
            submission = submit(self.settings, self.store, self.app, source, task, label=label, console=self.console)
        batch, rejects = submission.batch, len(submission.collected.rejects)
        # counted as progress counts them: jobs, and the files rejected at submit as failed ones
        self.console.print(f"batch {batch.batch_id}: {batch.num_jobs + rejects} to finish: {batch.num_jobs} jobs "
                           f"({batch.num_reused_done} already done, {len(batch.to_enqueue)} queued)"
                           + (f" and {rejects} files rejected at submit (failed)" if rejects else ""),
                           highlight=False)
        if "check_alive" not in self._watch and any(
                not state.is_terminal for state in self.store.batch_counts(batch.batch_id)):
            worker = self._services.enter_context(local_worker(self.settings, self._gpus))
            self.console.print(f"started a local worker (model {self.settings.model}); its log: {worker.log_path}")
            self._watch["check_alive"] = lambda: _check_alive(worker)
        return submission

    def finish(self, submission: Submission, out_dir: Path, openai_batch: bool = False) -> RunOutcome:
        """Wait for the batch to finish (unless a signal stopped the pipeline) and export its results to
        OUT_DIR/BATCH.jsonl (and, for an OpenAI Batch input, OUT_DIR/BATCH.openai.jsonl)."""
        batch_id = submission.batch.batch_id
        if self.stopped is None:
            try:
                with self.signals.interruptible():
                    wait_for_batch(self.store, batch_id, console=self.console, **self._watch)
            except Stopped as stopped:
                self.console.print(f"{stopped}: stopping the local worker (killed if it takes over "
                                   f"{WORKER_STOP_GRACE_S} s), then writing the results finished so far",
                                   highlight=False)
                self.stopped = stopped
                self._services.close()
        records = batch_records(self.store, batch_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        results_path = out_dir / f"{batch_id}.jsonl"
        results_path.write_text(render(records, "jsonl"), encoding="utf-8")
        if openai_batch:
            results_path = out_dir / f"{batch_id}.openai.jsonl"
            results_path.write_text(render(records, "openai"), encoding="utf-8")
        return RunOutcome(submission, batch_status(self.store, batch_id), records, results_path, self.stopped)


@contextlib.contextmanager
def local_pipeline(settings: Settings, gpus: str = "auto", console: Console | None = None) -> Iterator[LocalPipeline]:
    """A `LocalPipeline` under `StopSignals`; what it started (the worker, an embedded Redis) stops on leaving."""
    with StopSignals().installed() as signals, contextlib.ExitStack() as stack:
        yield LocalPipeline(settings, gpus, console or Console(stderr=True), stack, signals)


def run(settings: Settings, source: Source, task: TaskDefinition, *, gpus: str = "auto",
        out_dir: Path = Path("docbatch-results"), label: str | None = None,
        console: Console | None = None) -> RunOutcome:
    """Run `task` over the inputs of `source` end to end on this machine and export the results. A stop signal
    before the batch is recorded raises `Stopped`; after, the outcome says which signal stopped it (see the module's
    docstring)."""
    with local_pipeline(settings, gpus, console) as pipeline:
        submission = pipeline.submit(source, task, label)
        return pipeline.finish(submission, out_dir, openai_batch=source.openai_batch is not None)
