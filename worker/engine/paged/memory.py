"""How much GPU memory the KV cache gets: what is left under `gpu_memory_utilization` once the weights and
the largest step's activations are counted, measured by running that step once (as vLLM profiles); and the
report of where a worker's device memory went, logged at start and exported as gauges."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from schemas.settings import Settings
from worker.engine.paged.kv_cache import CacheShape, KVCache
from worker.engine.paged.sampler import Sampler, SamplingBatch
from worker.engine.paged.scheduler import DEFAULT_MAX_STEP_TOKENS, ScheduledStep
from worker.engine.paged.sequence import Sequence
from worker.engine.paged.step_inputs import StepInputs

log = logging.getLogger(__name__)
GIB = 1024 ** 3
REPORT_SEQUENCE_TOKENS = 4096  # KV capacity is also reported in sequences of this many tokens


@dataclass(frozen=True)
class MemoryReport:
    """Device memory of a built paged engine: weights in their format, the KV cache, the start-up peak."""

    weights_stored_as: str  # float32, bfloat16, or a converted format: fp16, int8, fp8, nf4
    weight_bytes: int
    kv_cache_dtype: str
    kv_cache_bytes: int
    kv_capacity_tokens: int  # the null block excluded
    peak_bytes: int | None  # most the device had allocated since start, graphs included; None on a CPU

    @classmethod
    def of(cls, model: Any, cache: KVCache) -> "MemoryReport":
        on_gpu = model.device.type == "cuda"
        # `bf16` means the weights as loaded: name their dtype (float32 on a CPU)
        weights = str(model.dtype).removeprefix("torch.") if model.weight_format == "bf16" else model.weight_format
        return cls(weights, model.weight_bytes, str(cache.shape.dtype).removeprefix("torch."),
                   cache.num_bytes, (cache.num_blocks - 1) * cache.shape.block_size,
                   torch.cuda.max_memory_allocated(model.device) if on_gpu else None)

    @property
    def kv_capacity_sequences(self) -> int:
        """Whole sequences of `REPORT_SEQUENCE_TOKENS` tokens the cache holds at once."""
        return self.kv_capacity_tokens // REPORT_SEQUENCE_TOKENS

    def summary(self) -> str:
        peak = "" if self.peak_bytes is None else f", peak {self.peak_bytes / GIB:.2f} GiB allocated"
        return (f"weights {self.weight_bytes / GIB:.2f} GiB ({self.weights_stored_as}), KV cache "
                f"{self.kv_cache_bytes / GIB:.2f} GiB ({self.kv_cache_dtype}) = {self.kv_capacity_tokens} tokens "
                f"({self.kv_capacity_sequences} sequences of {REPORT_SEQUENCE_TOKENS}){peak}")

    def record(self, stats: Any) -> None:
        """Copy the figures onto the engine's statistics, which the metrics exporter reads."""
        stats.weight_bytes = self.weight_bytes
        stats.kv_cache_bytes = self.kv_cache_bytes
        stats.kv_capacity_tokens = self.kv_capacity_tokens
        stats.kv_capacity_sequences = self.kv_capacity_sequences
        stats.device_peak_bytes = self.peak_bytes


@torch.inference_mode()
def profile_step_peak_bytes(model: Any, shape: CacheShape, attention_over: Callable[[KVCache], Any],
                            settings: Settings) -> int:
    """Bytes the worst step the settings allow needs beyond what is allocated now: a `max_step_tokens`
    prompt chunk, then penalised top-p sampling of `max_batch_size` rows under a grammar mask. The KV
    blocks that step uses are left out: they come out of the cache's own budget."""
    tokens = min(settings.max_step_tokens or DEFAULT_MAX_STEP_TOKENS, model.max_model_len - 1)
    rows = settings.max_batch_size
    cache = KVCache(shape, -(-tokens // shape.block_size) + 1, model.device)
    seq = Sequence(torch.randint(0, model.vocab_size, (tokens,)).tolist(), 1)
    seq.block_table = list(range(1, cache.num_blocks))
    inputs = StepInputs.build(ScheduledStep([seq], [tokens]), shape.block_size, model.device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hidden = model(inputs.input_ids, inputs.positions, attention_over(cache).plan(inputs))
    logits = model.compute_logits(hidden[-1:].expand(rows, -1))
    sampler = Sampler(rows, model.vocab_size, model.device)
    column = torch.ones((rows, 1), device=model.device)
    batch = SamplingBatch(torch.arange(rows, device=model.device), column * 1.1, column, column * 0.9,
                          torch.zeros(rows, dtype=torch.bool, device=model.device))
    sampler(logits, batch, torch.ones_like(logits, dtype=torch.bool))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del cache, hidden, logits, sampler
    torch.cuda.empty_cache()
    return peak


def gpu_kv_bytes(model: Any, shape: CacheShape, attention_over: Callable[[KVCache], Any], settings: Settings, *,
                 reserve_bytes: int) -> int:
    """Bytes for the KV cache: what the device has free now (weights, CUDA context and libraries' buffers
    already taken, whoever allocated them), less the share `gpu_memory_utilization` leaves to others, the
    profiled step's activations and `reserve_bytes` for what comes after (CUDA graphs)."""
    activations = profile_step_peak_bytes(model, shape, attention_over, settings)
    free, total = torch.cuda.mem_get_info()
    budget = free - int(total * (1 - settings.gpu_memory_utilization)) - activations - reserve_bytes
    log.info("GPU memory: %.1f GiB total, %.1f GiB free with the weights loaded, a step's activations %.1f GiB: "
             "%.1f GiB for the KV cache", total / 2**30, free / 2**30, activations / 2**30, budget / 2**30)
    if budget < shape.bytes_per_block * 2:
        raise RuntimeError(f"no GPU memory left for the KV cache ({budget / 2**30:.1f} GiB): lower max_step_tokens "
                           f"or max_batch_size, or raise gpu_memory_utilization")
    return budget
