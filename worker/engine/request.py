"""What goes into an engine and what comes out: the types every engine and every caller share.

The seam every engine implements (the paged and static engines here, the vLLM adapter):

- `engine.submit(model_input, max_new_tokens, options) -> concurrent.futures.Future` of a `Completion`.
- The engine calls `future.set_running_or_notify_cancel()` (through `FutureGate.start`) when it starts
  computing the request: the paged engine when the request is first scheduled into a step, the static engine
  when its batch starts. A future that was cancelled by then is dropped without being computed. So
  `future.cancel()`, from any thread, cancels a request the engine has not started (and returns False for one
  it has); the engine releases it promptly, not when its turn in the queue comes.
- `engine.abort(future) -> None` drops the request wherever it is (waiting or running), frees what it holds
  (its KV blocks), and makes its future raise `RequestAborted`. Idempotent; a finished future is left alone.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GenerationOptions:
    """How one request is decoded. The paged engine runs rows with different options in one step; the
    static (`hf`) engine never puts requests with different options into one `generate` call."""

    repetition_penalty: float = 1.0
    temperature: float = 0.0  # 0: greedy; above: sampled
    top_p: float = 1.0
    ignore_eos: bool = False  # benchmarks: every answer runs to its max_new_tokens

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class ModelInput:
    """One prompt: its token ids, and optionally the JSON schema its answer must match (constrained decoding).
    A vision model's prompt also carries its page images: for the hf engine as the processor's tensors (`extras`:
    `pixel_values`, `image_grid_thw`), for vLLM as the images themselves (`images`, PIL), which vLLM's own
    processor turns into tensors; either way `token_ids` hold every image expanded into its placeholders.
    `prefix_group` names the prefix the prompt shares with others (one document part's tasks: its prompts start
    with the document): the vLLM engine runs a group's prompts one after the other, so the prefix cache still holds
    the document when the next task reads it."""

    token_ids: list[int]
    extras: dict[str, Any] = field(default_factory=dict)
    json_schema: str | None = None
    images: tuple[Any, ...] = ()
    prefix_group: str | None = None


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # the answer's tokens, EOS stripped
    batch_size: int  # the most requests that shared one step (paged) or one generate call (hf) with this one


class RequestTooLarge(RuntimeError):
    """A single request does not fit on the device even alone."""


class RequestAborted(RuntimeError):
    """`engine.abort(future)` dropped the request, waiting or running: what its future raises."""


class FutureGate:
    """Where an engine changes its requests' futures, under one lock, so that each future is started at most
    once and settled exactly once whatever comes first: the engine's thread starting (`start`) or answering
    (`settle`) it, `abort` from any thread, or the caller's own `future.cancel()` (which the stdlib lets
    succeed only while the future is pending). Without it, starting a future aborted a moment before raises
    (and logs a critical line) and answering an aborted one raises `InvalidStateError` in the engine's loop."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entered when a done-callback aborts another request

    def start(self, future: Future) -> bool:
        """The engine starts computing the request: True from now on; False when it was cancelled or aborted
        (the engine then drops it uncomputed)."""
        with self._lock:
            if future.running():
                return True
            if future.done():
                return False
            return future.set_running_or_notify_cancel()

    def settle(self, future: Future, result: Any = None, error: BaseException | None = None) -> bool:
        """Give the request its outcome unless it already has one (cancelled, aborted); True when given."""
        with self._lock:
            if future.done():
                return False
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
            return True

    def abort(self, future: Future) -> bool:
        """Make the future raise `RequestAborted` unless it is done; True when it was aborted now."""
        return self.settle(future, error=RequestAborted("the request was aborted"))


@dataclass
class EngineStats:
    """Counters and gauges an engine keeps; the metrics exporter reads them at scrape time.

    Cumulative: num_steps, num_requests_finished, num_preemptions, tokens_in (prompt tokens computed,
    prefix-cache hits excluded), tokens_out, prefix_cache_hit_tokens. Gauges: the rest."""

    num_running: int = 0
    num_waiting: int = 0
    num_steps: int = 0
    num_requests_finished: int = 0
    num_preemptions: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    prefix_cache_hit_tokens: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_block_tokens: int = 0
    last_step_seqs: int = 0
    last_step_tokens: int = 0
    model_load_s: float = 0.0
    num_oom_splits: int = 0  # static engine: batches split after running out of memory
    num_decode_steps: int = 0  # paged engine: steps where every row decodes one token
    decode_step_s: float = 0.0  # their wall time, sampling included
    prefill_step_s: float = 0.0  # wall time of the steps that computed prompt tokens
    # Set once at start (None: not known for this engine): device memory, `worker.engine.paged.memory.MemoryReport`
    weight_bytes: int | None = None
    kv_cache_bytes: int | None = None
    kv_capacity_tokens: int | None = None
    kv_capacity_sequences: int | None = None  # of 4,096 tokens

    def summary(self) -> str:
        """One log line: work done, the mean decode step (where the engine times its steps), how full the KV cache is."""
        decode_ms = 1000 * self.decode_step_s / self.num_decode_steps if self.num_decode_steps else 0.0
        kv_share = self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
        timing = (f" ({self.num_decode_steps} decode-only, {decode_ms:.1f} ms each; {self.prefill_step_s:.1f} s in "
                  f"steps with prompt tokens)") if self.num_decode_steps or self.prefill_step_s else ""
        return (f"{self.num_steps} steps{timing}, {self.num_requests_finished} requests "
                f"done, {self.tokens_in} prompt tokens computed, {self.prefix_cache_hit_tokens} reused, "
                f"{self.tokens_out} generated, {self.num_preemptions} preemptions, {self.num_running} running, "
                f"{self.num_waiting} waiting, KV cache {kv_share:.0%} used")
