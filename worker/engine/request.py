"""What goes into an engine and what comes out: the types every engine and every caller share."""
from __future__ import annotations

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
    processor turns into tensors; either way `token_ids` hold every image expanded into its placeholders."""

    token_ids: list[int]
    extras: dict[str, Any] = field(default_factory=dict)
    json_schema: str | None = None
    images: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # the answer's tokens, EOS stripped
    batch_size: int  # the most requests that shared one step (paged) or one generate call (hf) with this one


class RequestTooLarge(RuntimeError):
    """A single request does not fit on the device even alone."""


class RequestAborted(RuntimeError):
    """The request was taken back (`engine.abort`) before it finished."""


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
    device_peak_bytes: int | None = None  # most allocated on the GPU during start-up (graphs included)

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
