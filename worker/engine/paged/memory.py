"""Where a paged engine's memory went (weights in their format, the KV cache), logged at start and exported as
gauges."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker.engine.paged.kv_cache import KVCache

GIB = 1024 ** 3
REPORT_SEQUENCE_TOKENS = 4096  # KV capacity is also reported in sequences of this many tokens


@dataclass(frozen=True)
class MemoryReport:
    """Memory of a built paged engine: weights in their format, the KV cache."""

    weights_stored_as: str  # the model's dtype (float32, bfloat16), or fp16 (FBGEMM's packed weights)
    weight_bytes: int
    kv_cache_dtype: str
    kv_cache_bytes: int
    kv_capacity_tokens: int  # the null block excluded

    @classmethod
    def of(cls, model: Any, cache: KVCache) -> "MemoryReport":
        # `bf16` means the weights as loaded: name their dtype (float32 on a CPU)
        weights = str(model.dtype).removeprefix("torch.") if model.weight_format == "bf16" else model.weight_format
        return cls(weights, model.weight_bytes, str(cache.shape.dtype).removeprefix("torch."),
                   cache.num_bytes, (cache.num_blocks - 1) * cache.shape.block_size)

    @property
    def kv_capacity_sequences(self) -> int:
        """Whole sequences of `REPORT_SEQUENCE_TOKENS` tokens the cache holds at once."""
        return self.kv_capacity_tokens // REPORT_SEQUENCE_TOKENS

    def summary(self) -> str:
        return (f"weights {self.weight_bytes / GIB:.2f} GiB ({self.weights_stored_as}), KV cache "
                f"{self.kv_cache_bytes / GIB:.2f} GiB ({self.kv_cache_dtype}) = {self.kv_capacity_tokens} tokens "
                f"({self.kv_capacity_sequences} sequences of {REPORT_SEQUENCE_TOKENS})")

    def record(self, stats: Any) -> None:
        """Copy the figures onto the engine's statistics, which the metrics exporter reads."""
        stats.weight_bytes = self.weight_bytes
        stats.kv_cache_bytes = self.kv_cache_bytes
        stats.kv_capacity_tokens = self.kv_capacity_tokens
        stats.kv_capacity_sequences = self.kv_capacity_sequences
