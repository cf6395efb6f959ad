"""The engine's statistics as Prometheus series, read at scrape time from `engine.stats`.

The contract with the engine is the attribute names below. Counters are cumulative since the engine
started (derive per-second figures with PromQL `rate()`); gauges are the state now. An attribute the
running engine does not have is left out, so one collector serves every engine version.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# engine.stats attribute -> (metric name, help); counters get `_total` appended by the exposition
ENGINE_COUNTERS = {
    "num_steps": ("docbatch_engine_steps", "engine steps run"),
    "num_requests_finished": ("docbatch_engine_requests_finished", "requests the engine finished"),
    "num_preemptions": ("docbatch_engine_preemptions", "sequences preempted for want of KV cache room"),
    "tokens_in": ("docbatch_engine_tokens_in", "prompt tokens computed (prefix-cache hits excluded)"),
    "tokens_out": ("docbatch_engine_tokens_out", "tokens generated"),
    "prefix_cache_hit_tokens": ("docbatch_engine_prefix_cache_hit_tokens", "prompt tokens read from the prefix cache"),
}
ENGINE_GAUGES = {
    "num_running": ("docbatch_engine_running_sequences", "sequences decoding now"),
    "num_waiting": ("docbatch_engine_waiting_requests", "requests waiting for room"),
    "kv_blocks_total": ("docbatch_engine_kv_blocks", "KV cache blocks"),
    "kv_blocks_used": ("docbatch_engine_kv_blocks_used", "KV cache blocks in use"),
    "kv_block_tokens": ("docbatch_engine_kv_block_tokens", "tokens per KV cache block"),
    "last_step_seqs": ("docbatch_engine_last_step_sequences", "sequences in the last engine step"),
    "last_step_tokens": ("docbatch_engine_last_step_tokens", "tokens in the last engine step"),
    "model_load_s": ("docbatch_model_load_seconds", "time the model took to load"),
    "weight_bytes": ("docbatch_engine_weight_bytes", "device memory the model's weights take, in their format"),
    "kv_cache_bytes": ("docbatch_engine_kv_cache_bytes", "device memory of the KV cache"),
    "kv_capacity_tokens": ("docbatch_engine_kv_capacity_tokens", "tokens the KV cache holds"),
    "kv_capacity_sequences": ("docbatch_engine_kv_capacity_sequences_4k",
                              "sequences of 4,096 tokens the KV cache holds"),
}


def read_stats(stats: Any) -> dict[str, float]:
    """The contract's attributes that `stats` has, as numbers."""
    names = [*ENGINE_COUNTERS, *ENGINE_GAUGES]
    return {name: float(value) for name in names if (value := getattr(stats, name, None)) is not None}


class EngineCollector:
    """Prometheus collector over `stats()` (the running engine's statistics object, or None)."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        values = read_stats(self._stats())
        for attribute, (name, documentation) in ENGINE_COUNTERS.items():
            if attribute in values:
                yield CounterMetricFamily(name, documentation, value=values[attribute])
        for attribute, (name, documentation) in ENGINE_GAUGES.items():
            if attribute in values:
                yield GaugeMetricFamily(name, documentation, value=values[attribute])
        if values.get("kv_blocks_total"):
            yield GaugeMetricFamily("docbatch_engine_kv_cache_usage_ratio", "share of the KV cache in use",
                                    value=values.get("kv_blocks_used", 0.0) / values["kv_blocks_total"])
