"""The static-batch (`hf`) engine: requests gathered into batches, each one transformers `generate` call.

Celery task threads call `submit` and wait on the returned future. One engine thread loops: gather
waiting requests (up to the batch caps, waiting at most `max_wait_ms` for more), plan batches by length,
run each through the generator, resolve the futures. Every row of a batch waits for its longest one. A
request's future is started when its batch starts; one cancelled or aborted before is never computed. A
`generate` call cannot drop a row, so a request aborted while its batch runs raises `RequestAborted` at once
and its row is computed to the batch's end, its answer discarded. It
runs what the paged engine does not (image-text models, models sharded over GPUs) and is the reference
the paged engine's tests compare with. The engine knows nothing of Celery.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

from worker.engine.batching import PlanItem, padded_cost, plan_batches
from worker.engine.request import Completion, EngineStats, FutureGate, GenerationOptions, ModelInput, RequestTooLarge

log = logging.getLogger(__name__)

# (prompts, max new tokens per prompt, options) -> generated token ids per prompt, EOS stripped
Generator = Callable[[Sequence[ModelInput], Sequence[int], GenerationOptions], list[list[int]]]


@dataclass
class Request:
    model_input: ModelInput
    max_new_tokens: int
    options: GenerationOptions
    future: Future = field(default_factory=Future)


def _is_oom(error: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # the engine itself needs no torch
        return False
    return isinstance(error, torch.cuda.OutOfMemoryError)


class StaticEngine:
    """Gathers requests from many threads into batched generate calls."""

    def __init__(self, generate: Generator, *, max_batch_size: int, max_batch_tokens: int, max_wait_ms: int,
                 on_oom: Callable[[], None] = lambda: None) -> None:
        self._generate = generate
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000
        self._on_oom = on_oom
        self._inbox: queue.Queue[Request] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="docbatch-engine", daemon=True)
        self._gate = FutureGate()
        self.stats = EngineStats()

    def start(self) -> "StaticEngine":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def submit(self, model_input: ModelInput, max_new_tokens: int,
               options: GenerationOptions = GenerationOptions()) -> Future:
        """Queue one prompt; the future resolves to a `Completion` or raises the error that request met (or
        `RequestAborted`). `future.cancel()` succeeds until the request's batch starts."""
        request = Request(model_input, max_new_tokens, options)
        if self._stop.is_set():
            request.future.set_exception(RuntimeError("engine is stopped"))
        else:
            self._inbox.put(request)
        return request.future

    def abort(self, future: Future) -> None:
        """The request's future raises `RequestAborted` now; waiting, it is never computed (see the module's
        docstring for one whose batch runs). Idempotent; a finished request is left alone."""
        self._gate.abort(future)

    # -- the loop: gather -> plan -> run --------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            by_options: dict[GenerationOptions, list[Request]] = {}
            for request in self._gather():
                by_options.setdefault(request.options, []).append(request)
            for group in by_options.values():
                items = [PlanItem(len(r.model_input.token_ids), r.max_new_tokens) for r in group]
                for indices in plan_batches(items, self.max_batch_size, self.max_batch_tokens):
                    self._run([group[i] for i in indices])

    def _gather(self) -> list[Request]:
        """Block for one request, then take more until a cap is reached or `max_wait_ms` has passed. Requests
        cancelled or aborted while they waited are passed over."""
        try:
            pending = [self._inbox.get(timeout=0.2)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.max_wait_s
        while len(pending) < self.max_batch_size and not self._over_budget(pending):
            remaining = deadline - time.monotonic()
            try:
                pending.append(self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait())
            except queue.Empty:
                break
        return [request for request in pending if not request.future.done()]

    def _over_budget(self, pending: list[Request]) -> bool:
        return padded_cost([len(r.model_input.token_ids) for r in pending],
                           [r.max_new_tokens for r in pending]) >= self.max_batch_tokens

    def _run(self, batch: list[Request]) -> None:
        """Generate for `batch`; on any error split it in halves so one bad request never sinks the rest."""
        batch = [request for request in batch if self._gate.start(request.future)]
        if not batch:
            return
        try:
            outputs = self._generate([r.model_input for r in batch], [r.max_new_tokens for r in batch],
                                     batch[0].options)
        except Exception as error:  # noqa: BLE001 - every request gets its own outcome below
            is_oom = _is_oom(error)
            if is_oom:
                self._on_oom()
            if len(batch) == 1:
                log.warning("request failed alone (%d prompt tokens): %r", len(batch[0].model_input.token_ids), error)
                failure = RequestTooLarge(f"does not fit in device memory: {error}") if is_oom else error
                self._gate.settle(batch[0].future, error=failure)
                return
            self.stats.num_oom_splits += is_oom
            log.info("batch of %d failed (%s); splitting", len(batch), "OOM" if is_oom else type(error).__name__)
            middle = len(batch) // 2
            self._run(batch[:middle])
            self._run(batch[middle:])
            return
        self.stats.num_steps += 1
        self.stats.num_requests_finished += len(batch)
        self.stats.last_step_seqs = len(batch)
        for request, token_ids in zip(batch, outputs):
            self.stats.tokens_out += len(token_ids)
            self._gate.settle(request.future, Completion(token_ids, len(batch)))
