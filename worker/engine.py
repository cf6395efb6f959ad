"""The in-process engine: dynamic batching across concurrently running tasks.

Celery task threads call `Engine.submit` and wait on the returned future. One engine thread loops:
gather waiting requests (up to the batch caps, waiting at most `max_wait_ms` for more), plan batches
by length, run each through the generator, resolve the futures. The engine knows nothing of Celery.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from worker.batching import PlanItem, padded_cost, plan_batches

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings one generate call shares; requests with different options never share a batch."""

    repetition_penalty: float = 1.0
    temperature: float = 0.0  # 0: greedy; above: sampled
    top_p: float = 1.0
    ignore_eos: bool = False  # benchmarks: every answer runs to its max_new_tokens


@dataclass(frozen=True)
class ModelInput:
    """One prompt: its token ids, per-row tensors a vision model needs (e.g. `pixel_values`,
    `image_grid_thw`), which the generator concatenates across the rows of a batch, and optionally
    the JSON schema its answer must match (rows of one batch may have different schemas, or none)."""

    token_ids: list[int]
    extras: dict[str, Any] = field(default_factory=dict)
    json_schema: str | None = None  # the answer must be JSON matching this schema (constrained decoding)


# (prompts, max new tokens per prompt, options) -> generated token ids per prompt, EOS stripped
Generator = Callable[[Sequence[ModelInput], Sequence[int], GenerationOptions], list[list[int]]]


class RequestTooLarge(RuntimeError):
    """A single request does not fit on the device even alone."""


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    batch_size: int  # rows in the generate call this request ran in


@dataclass
class Request:
    model_input: ModelInput
    max_new_tokens: int
    options: GenerationOptions
    future: Future = field(default_factory=Future)


@dataclass
class EngineStats:
    num_batches: int = 0
    num_requests: int = 0
    num_oom_splits: int = 0
    tokens_out: int = 0
    batch_sizes: list[int] = field(default_factory=list)


def _is_oom(error: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # the engine itself needs no torch
        return False
    return isinstance(error, torch.cuda.OutOfMemoryError)


class Engine:
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
        self.stats = EngineStats()

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def submit(self, model_input: ModelInput, max_new_tokens: int,
               options: GenerationOptions = GenerationOptions()) -> Future:
        """Queue one prompt; the future resolves to a `Completion` or raises the error that request met."""
        request = Request(model_input, max_new_tokens, options)
        if self._stop.is_set():
            request.future.set_exception(RuntimeError("engine is stopped"))
        else:
            self._inbox.put(request)
        return request.future

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
        """Block for one request, then take more until a cap is reached or `max_wait_ms` has passed."""
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
        return pending

    def _over_budget(self, pending: list[Request]) -> bool:
        return padded_cost([len(r.model_input.token_ids) for r in pending],
                           [r.max_new_tokens for r in pending]) >= self.max_batch_tokens

    def _run(self, batch: list[Request]) -> None:
        """Generate for `batch`; on any error split it in halves so one bad request never sinks the rest."""
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
                batch[0].future.set_exception(failure)
                return
            self.stats.num_oom_splits += is_oom
            log.info("batch of %d failed (%s); splitting", len(batch), "OOM" if is_oom else type(error).__name__)
            middle = len(batch) // 2
            self._run(batch[:middle])
            self._run(batch[middle:])
            return
        self.stats.num_batches += 1
        self.stats.num_requests += len(batch)
        self.stats.batch_sizes.append(len(batch))
        for request, token_ids in zip(batch, outputs):
            self.stats.tokens_out += len(token_ids)
            request.future.set_result(Completion(token_ids, len(batch)))
