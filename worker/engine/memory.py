"""How much GPU memory the KV cache gets: what is left under `gpu_memory_utilization` once the weights and
the largest step's activations are counted, measured by running that step once (as vLLM profiles)."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from schemas.settings import Settings
from worker.engine.kv_cache import CacheShape, KVCache
from worker.engine.sampler import Sampler, SamplingBatch
from worker.engine.scheduler import ScheduledStep
from worker.engine.sequence import Sequence
from worker.engine.step_inputs import StepInputs

log = logging.getLogger(__name__)


@torch.inference_mode()
def profile_step_peak_bytes(model: Any, shape: CacheShape, attention_over: Callable[[KVCache], Any],
                            settings: Settings) -> int:
    """Bytes the worst step the settings allow needs beyond what is allocated now: a `max_step_tokens`
    prompt chunk, then penalised top-p sampling of `max_batch_size` rows under a grammar mask. The KV
    blocks that step uses are left out: they come out of the cache's own budget."""
    tokens = min(settings.max_step_tokens, model.max_model_len - 1)
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
