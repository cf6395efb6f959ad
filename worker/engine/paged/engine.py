"""The paged engine: continuous batching over a paged KV cache, in one thread beside the Celery tasks.

Task threads call `submit` and wait on the returned future. The engine thread loops over steps, each
three calls (nano-vllm's shape): the scheduler picks the step's sequences and token counts, the runner
computes it, and the scheduler records the result, finishing sequences the moment they end. New
requests join at the next step; nobody waits for a batch to form. A request's future is started when it is
first scheduled; one cancelled before that, or aborted (`abort`) at any time, leaves the engine at the next
step, its KV blocks freed. The engine knows nothing of Celery.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

from worker.engine.cpu_threads import CpuThreads
from worker.engine.request import (
    Completion,
    EngineStats,
    FutureGate,
    GenerationOptions,
    ModelInput,
    RequestAborted,
    RequestTooLarge,
)
from worker.engine.paged.runner import ModelRunner
from worker.engine.paged.scheduler import ScheduledStep, Scheduler
from worker.engine.paged.sequence import Sequence

log = logging.getLogger(__name__)
STATS_LOG_INTERVAL_S = 10  # also logged whenever the engine runs out of work


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, (torch.OutOfMemoryError, MemoryError))


class PagedEngine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, *, eos_token_ids: frozenset[int],
                 grammars: Callable[[], Any], threads: CpuThreads | None = None) -> None:
        self.runner = runner
        self.threads = threads  # on a CPU: the engine thread's torch threads, set from the free cores
        self.scheduler = scheduler
        self.eos_token_ids = eos_token_ids
        self._make_grammars = grammars  # builds the GrammarCache on the first constrained request
        self._grammars: Any = None
        self._grammars_lock = threading.Lock()
        # (sequence, future): a new request; (sequence, None): one cancelled or aborted, to be dropped
        self._inbox: queue.SimpleQueue[tuple[Sequence, Future | None]] = queue.SimpleQueue()
        self._futures: dict[int, Future] = {}
        self._gate = FutureGate()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="docbatch-engine", daemon=True)
        # What to do when the loop itself breaks (a bug, not a failed step): by default fail every waiting
        # request; a worker process exits instead, so that its supervisor starts a fresh one.
        self.on_fatal: Callable[[BaseException], None] = self._fail_all
        blocks = scheduler.blocks
        self.stats = EngineStats(kv_blocks_total=blocks.num_usable_blocks, kv_block_tokens=blocks.block_size)
        self._logged_at = time.monotonic()

    def start(self) -> "PagedEngine":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        for future in list(self._futures.values()):
            self._gate.settle(future, error=RuntimeError("the engine stopped"))
        self._futures.clear()

    def submit(self, model_input: ModelInput, max_new_tokens: int,
               options: GenerationOptions = GenerationOptions()) -> Future:
        """Queue one prompt; the future resolves to a `Completion`, or raises `RequestTooLarge` (it can never
        fit), `ValueError` (a bad request), the error its step met when it ran alone, or `RequestAborted`.
        `future.cancel()` succeeds until the request is first scheduled."""
        future: Future = Future()
        try:
            seq = self._sequence(model_input, max_new_tokens, options)
        except (ValueError, RequestTooLarge) as error:
            future.set_exception(error)
            return future
        if self._stop.is_set():
            future.set_exception(RuntimeError("the engine is stopped"))
        else:
            self._inbox.put((seq, future))
            future.add_done_callback(lambda done: self._dropped(seq, done))
        return future

    def abort(self, future: Future) -> None:
        """Drop the request wherever it is (waiting or running): its future raises `RequestAborted` now, its KV
        blocks are freed at the next step. Idempotent; a finished request is left alone."""
        self._gate.abort(future)

    def _dropped(self, seq: Sequence, future: Future) -> None:
        """A done-callback (any thread): a request cancelled or aborted leaves the engine at the next step."""
        if future.cancelled() or isinstance(future.exception(), RequestAborted):
            self._inbox.put((seq, None))

    def _sequence(self, model_input: ModelInput, max_new_tokens: int, options: GenerationOptions) -> Sequence:
        tokens = model_input.token_ids
        vocab_size, max_len = self.runner.model.vocab_size, self.scheduler.max_model_len
        if model_input.extras:
            raise ValueError("the paged engine takes text prompts only; image prompts run on the hf engine")
        if not tokens or max_new_tokens < 1:
            raise ValueError("a request needs at least one prompt token and one new token")
        if min(tokens) < 0 or max(tokens) >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        if len(tokens) >= max_len:
            raise RequestTooLarge(f"the prompt's {len(tokens)} tokens leave no room in the model's {max_len}")
        blocks = self.scheduler.blocks
        if blocks.blocks_for(min(len(tokens) + max_new_tokens, max_len)) > blocks.num_usable_blocks:
            raise RequestTooLarge(f"{len(tokens)} + {max_new_tokens} tokens exceed the KV cache "
                                  f"({blocks.num_usable_blocks * blocks.block_size} tokens)")
        matcher = self._matcher(model_input.json_schema) if model_input.json_schema else None
        return Sequence(tokens, max_new_tokens, options, eos_token_ids=self.eos_token_ids, matcher=matcher)

    def _matcher(self, schema: str) -> Any:
        """A fresh matcher for `schema` (compiled once); ValueError when llguidance cannot compile it."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = self._make_grammars()
        return self._grammars.matcher(schema)

    # -- the loop: schedule -> run -> postprocess -------------------------------------------------
    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException as error:  # noqa: BLE001 - nothing would ever answer the waiting requests
            log.critical("the engine loop broke: %r", error, exc_info=error)
            self.on_fatal(error)

    def _fail_all(self, error: BaseException) -> None:
        self._stop.set()
        for future in list(self._futures.values()):
            self._gate.settle(future, error=RuntimeError(f"the engine stopped: {error!r}"))
        self._futures.clear()

    def _steps(self) -> None:
        while not self._stop.is_set():
            self._take_new(wait=not self.scheduler.has_work)
            step = self._started(self.scheduler.schedule())
            if not step.seqs:
                continue
            if self.threads is not None:
                self.threads.adjust()
            tokens_in, started = self._prompt_tokens(step), time.perf_counter()
            try:
                sampled = self.runner.run(step)
            except Exception as error:  # noqa: BLE001 - the step's requests get their own outcome
                self._step_failed(step, error)
                continue
            finished = self.scheduler.postprocess(step, sampled)
            self._record(step, tokens_in, sum(t is not None for t in sampled), time.perf_counter() - started)
            for seq in finished:
                self._resolve(seq)

    def _take_new(self, wait: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.2) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            seq, future = item
            if future is None:
                self._drop(seq)
            else:
                self._futures[seq.seq_id] = future
                self.scheduler.add(seq)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _started(self, step: ScheduledStep) -> ScheduledStep:
        """Start the futures of the step's requests (a no-op for those started before); a request cancelled or
        aborted meanwhile is dropped from the step uncomputed."""
        gone = [seq for seq in step.seqs if not self._gate.start(self._futures[seq.seq_id])]
        for seq in gone:
            self._drop(seq)
        if gone:
            step.remove(gone)
        return step

    def _drop(self, seq: Sequence) -> None:
        """Take a cancelled or aborted request out of the engine and free its blocks (once)."""
        if self._futures.pop(seq.seq_id, None) is not None:
            self.scheduler.finish(seq)

    def _step_failed(self, step: ScheduledStep, error: Exception) -> None:
        """A step raised: alone, its request fails; shared, every request in it runs again alone, so only
        the one that breaks the model fails."""
        if len(step.seqs) == 1:
            seq = step.seqs[0]
            log.warning("request of %d prompt tokens failed alone: %r", seq.num_prompt_tokens, error)
            seq.error = RequestTooLarge(f"does not fit in device memory: {error}") if _is_oom(error) else error
            self.scheduler.finish(seq)
            self._resolve(seq)
            return
        log.warning("a step of %d requests failed (%r); running each alone", len(step.seqs), error)
        self.scheduler.quarantine(step.seqs)

    def _resolve(self, seq: Sequence) -> None:
        future = self._futures.pop(seq.seq_id)
        if seq.error is not None:
            self._gate.settle(future, error=seq.error)
        else:
            self._gate.settle(future, Completion(seq.completion_token_ids, seq.max_step_seqs))

    @staticmethod
    def _prompt_tokens(step: ScheduledStep) -> int:
        return sum(max(0, min(count, seq.num_prompt_tokens - seq.num_computed_tokens))
                   for seq, count in zip(step.seqs, step.num_new_tokens))

    def _record(self, step: ScheduledStep, tokens_in: int, tokens_out: int, seconds: float) -> None:
        stats, scheduler = self.stats, self.scheduler
        stats.num_steps += 1
        if step.is_decode_only:
            stats.num_decode_steps += 1
            stats.decode_step_s += seconds
        else:
            stats.prefill_step_s += seconds
        stats.tokens_in += tokens_in
        stats.tokens_out += tokens_out
        stats.last_step_seqs, stats.last_step_tokens = len(step.seqs), step.num_tokens
        stats.num_running, stats.num_waiting = len(scheduler.running), len(scheduler.waiting)
        stats.num_requests_finished = stats.num_requests_finished + sum(s.is_finished for s in step.seqs)
        stats.num_preemptions = scheduler.num_preemptions
        stats.prefix_cache_hit_tokens = scheduler.prefix_cache_hit_tokens
        stats.kv_blocks_used = scheduler.blocks.num_used_blocks
        now = time.monotonic()
        if now - self._logged_at >= STATS_LOG_INTERVAL_S or not scheduler.has_work:
            self._logged_at = now
            log.info("engine stats: %s", stats.summary())
