"""`docbatch run`: the whole pipeline on one machine in one command.

Uses the configured Redis when it answers, else an embedded one; submits; starts a local worker (GPU if
present, else CPU) when the batch has work left (not when every job is already done); shows progress;
writes `./docbatch-results/BATCH.jsonl` (and, for an OpenAI Batch input, `BATCH.openai.jsonl` in its output
format); stops what it started.

A signal (SIGTERM from `timeout`, a scheduler or systemd; SIGHUP when the terminal goes; SIGINT, Ctrl-C) unwinds the
same way: the local worker is stopped (its process group, SIGKILL after `WORKER_STOP_GRACE_S`), an embedded Redis
after it, the results finished by then are written, and the command exits 128 + the signal's number (143 for
SIGTERM). The jobs not finished stay in the store; running the same inputs again finishes them.
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


def run(settings: Settings, source: Source, task: TaskDefinition, *, gpus: str = "auto",
        out_dir: Path = Path("docbatch-results"), label: str | None = None,
        console: Console | None = None) -> RunOutcome:
    """Run `task` over the inputs of `source` end to end on this machine and export the results. A stop signal
    before the batch is recorded raises `Stopped`; after, the outcome says which signal stopped it (see the module's
    docstring)."""
    console = console or Console(stderr=True)
    with StopSignals().installed() as signals, contextlib.closing(
            Store(settings.effective_database_url, settings.blob_dir)) as store:
        store.migrate()
        with contextlib.ExitStack() as stack:
            url = stack.enter_context(redis_for(settings.broker_url, console))
            settings = settings.model_copy(update={"broker_url": url})
            app = make_celery(settings)
            with signals.interruptible():
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
                watch["check_alive"] = lambda: _check_alive(worker)
            try:
                with signals.interruptible():
                    wait_for_batch(store, batch.batch_id, console=console, **watch)
            except Stopped as stopped:
                console.print(f"{stopped}: stopping the local worker (killed if it takes over "
                              f"{WORKER_STOP_GRACE_S} s), then writing the results finished so far", highlight=False)
        records = batch_records(store, batch.batch_id)
        out_dir.mkdir(parents=True, exist_ok=True)
        results_path = out_dir / f"{batch.batch_id}.jsonl"
        results_path.write_text(render(records, "jsonl"), encoding="utf-8")
        if source.openai_batch is not None:
            results_path = out_dir / f"{batch.batch_id}.openai.jsonl"
            results_path.write_text(render(records, "openai"), encoding="utf-8")
        stopped_by = None if signals.signum is None else Stopped(signals.signum)
        return RunOutcome(submission, batch_status(store, batch.batch_id), records, results_path, stopped_by)
