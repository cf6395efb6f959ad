"""Which engine a worker runs (`DOCBATCH_ENGINE`), and building it around the loaded model.

`vllm` runs on a GPU (and on a CPU with vLLM's CPU build): every architecture and checkpoint format vLLM reads,
image-text models included; it loads the weights itself, so the worker loads only the tokenizer and processor
(`uses_vllm` tells before anything is loaded). `paged` (docbatch's own continuous batching over a paged KV cache)
runs every text model of the Llama family (Llama, Qwen2, Qwen2.5) on a CPU; `hf` (static batches through
transformers' `generate`) runs the rest, image-text models on a CPU and any model on a GPU without vLLM included, and
stays as the reference the tests compare the paged engine with. `auto` picks `vllm` on a GPU where vLLM is
installed, else `paged` wherever it can, else `hf`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from typing import Any

from schemas.settings import Settings
from worker.engine.request import ModelInput

log = logging.getLogger(__name__)

GIB = 1024 ** 3
CPU_KV_CACHE_BYTES = 1 * GIB  # the default on a CPU, where memory is not measured


def uses_vllm(settings: Settings) -> bool:
    """Whether the worker's engine is vLLM: asked for, or `auto` on a GPU where vLLM is installed."""
    if settings.engine != "auto":
        return settings.engine == "vllm"
    if settings.device == "cpu" or importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


def vllm_engine_args(settings: Settings, loaded: Any, tensor_parallel_size: int = 1) -> dict[str, Any]:
    """vLLM's `EngineArgs` for these settings and the model `loaded` describes (its weights not loaded)."""
    on_cpu = loaded.device == "cpu"
    args: dict[str, Any] = dict(
        model=loaded.source, tokenizer=loaded.source, dtype=settings.dtype, seed=0,
        max_num_seqs=settings.max_batch_size, max_num_batched_tokens=settings.max_step_tokens or None,
        gpu_memory_utilization=settings.gpu_memory_utilization, enable_prefix_caching=True,
        scheduling_policy="priority",  # the adapter's places in line: one document's tasks run together
        kv_cache_dtype=settings.kv_cache_dtype,
        enforce_eager=on_cpu or not settings.cuda_graphs, tensor_parallel_size=tensor_parallel_size,
        distributed_executor_backend="uni" if tensor_parallel_size == 1 else None)
    kv_bytes = int(settings.kv_cache_gb * GIB) or (CPU_KV_CACHE_BYTES if on_cpu else 0)
    if kv_bytes:
        args["kv_cache_memory_bytes"] = kv_bytes
    if settings.max_model_len:
        args["max_model_len"] = settings.max_model_len
    quantization = {"fp8": "fp8", "nf4": "bitsandbytes"}.get(settings.weight_format)
    if quantization:  # otherwise the checkpoint's own format (AWQ, GPTQ, FP8, ... from its quantization_config)
        args["quantization"] = quantization
    if loaded.is_vision:
        side = settings.max_image_side
        args["limit_mm_per_prompt"] = {"image": settings.max_pages}
        args["mm_processor_kwargs"] = {"max_pixels": side * side}
    return {name: value for name, value in args.items() if value is not None}


def paged_unsupported(loaded: Any) -> str | None:
    """Why the paged engine cannot run this loaded model, or None."""
    from worker.engine.paged.model import unsupported_reason

    if loaded.device != "cpu":
        return "the paged engine runs on a CPU; on a GPU vLLM runs the model (pip install 'docbatch[gpu]')"
    if loaded.is_vision:
        return "image-text models run on the hf engine"
    return unsupported_reason(loaded.model.config)


def engine_kind(settings: Settings, loaded: Any) -> str:
    """`paged` or `hf`; ValueError where the settings ask for what the engine that would run cannot do."""
    reason = "DOCBATCH_ENGINE=hf" if settings.engine == "hf" else paged_unsupported(loaded)
    if reason is None:
        return "paged"
    if settings.engine == "paged":
        raise ValueError(f"DOCBATCH_ENGINE=paged cannot run {settings.model}: {reason}")
    log.info("the hf engine runs %s: %s", settings.model, reason)
    return "hf"


def build_engine(settings: Settings, loaded: Any) -> Any:
    """The started engine for `loaded` (a `worker.models.loading.LoadedModel`): vLLM, paged or hf. ValueError where
    the settings ask for what the engine that runs cannot do (vLLM's weight formats and KV cache dtype)."""
    if uses_vllm(settings):
        return _vllm(settings, loaded)
    if settings.weight_format != "bf16" or settings.kv_cache_dtype != "auto":
        raise ValueError(f"weight_format {settings.weight_format} and kv_cache_dtype {settings.kv_cache_dtype} are "
                         f"vLLM's (the engine on a GPU); the {settings.engine} engine keeps weights and KV as loaded")
    return (_paged(settings, loaded) if engine_kind(settings, loaded) == "paged" else _static(settings, loaded)).start()


def _vllm(settings: Settings, loaded: Any) -> Any:
    import torch

    from worker.engine.vllm_engine import VllmEngine

    gpus = torch.cuda.device_count() if loaded.device == "cuda" else 1
    args = vllm_engine_args(settings, loaded, tensor_parallel_size=gpus)
    # vLLM's engine core is a process of its own, forked by default. A fork would inherit this process's threads,
    # and torch's CUDA queries (device_count above) leave forked children unable to use CUDA: start it fresh.
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"

    def make_llm(stat_loggers: list[Any]) -> Any:
        from vllm import EngineArgs, LLMEngine
        from vllm.config import StructuredOutputsConfig

        # llguidance, the grammar library the other engines use: JSON schemas compile alike
        guidance = StructuredOutputsConfig(backend="guidance")
        from vllm.usage.usage_lib import UsageContext

        # vLLM's defaults for a batch engine (LLM.generate's): its step budget suits a GPU's size
        return LLMEngine.from_engine_args(EngineArgs(**args, structured_outputs_config=guidance),
                                          usage_context=UsageContext.LLM_CLASS, stat_loggers=stat_loggers)

    return VllmEngine(make_llm, max_num_seqs=settings.max_batch_size, eos_token_ids=loaded.eos_token_ids,
                      image_token_id=getattr(loaded.config, "image_token_id", None)).start()


def _static(settings: Settings, loaded: Any) -> Any:
    import torch

    from worker.engine.hf_generator import HFGenerator
    from worker.engine.static_engine import StaticEngine

    from worker.engine.quant import weight_bytes

    generator = HFGenerator(loaded.hf_engine_model(), loaded.tokenizer, loaded.eos_token_ids)
    generator([ModelInput([loaded.tokenizer.pad_token_id] * 8)], [2])  # warm-up: CUDA context and kernels
    on_oom = torch.cuda.empty_cache if loaded.device == "cuda" else (lambda: None)
    engine = StaticEngine(generator, max_batch_size=settings.max_batch_size,
                          max_batch_tokens=settings.max_batch_tokens, max_wait_ms=settings.max_wait_ms, on_oom=on_oom)
    engine.stats.weight_bytes = weight_bytes(loaded.model)  # offloaded layers included: it is the model's size
    return engine


def _paged(settings: Settings, loaded: Any) -> Any:
    from worker.engine.cpu_threads import CpuThreads
    from worker.engine.grammar import GrammarCache
    from worker.engine.paged.attention import TorchAttention
    from worker.engine.paged.block_manager import BlockManager
    from worker.engine.paged.engine import PagedEngine
    from worker.engine.paged.kv_cache import CacheShape, KVCache
    from worker.engine.paged.memory import MemoryReport
    from worker.engine.paged.model import DecoderModel
    from worker.engine.paged.runner import ModelRunner
    from worker.engine.paged.scheduler import DEFAULT_MAX_STEP_TOKENS, Scheduler

    started = time.perf_counter()
    model = DecoderModel(loaded.model, weight_format="fp16" if loaded.cpu_fp16 else "bf16", device=loaded.device)
    shape = CacheShape(len(model.layers), model.heads.num_kv_heads, model.heads.head_dim, settings.kv_block_tokens,
                       model.dtype)
    cache = KVCache(shape, shape.blocks_in(settings.kv_cache_gb * GIB or CPU_KV_CACHE_BYTES), model.device)
    attention = TorchAttention(cache, model.heads)
    runner = ModelRunner(model, cache, attention, max_num_seqs=settings.max_batch_size)
    scheduler = Scheduler(BlockManager(cache.num_blocks, cache.shape.block_size), max_num_seqs=settings.max_batch_size,
                          max_step_tokens=settings.max_step_tokens or DEFAULT_MAX_STEP_TOKENS,
                          max_model_len=model.max_model_len)
    engine = PagedEngine(runner, scheduler, eos_token_ids=loaded.eos_token_ids,
                         grammars=lambda: GrammarCache(loaded.tokenizer, model.vocab_size),
                         threads=CpuThreads(settings.cpu_threads))
    report = MemoryReport.of(model, cache)
    report.record(engine.stats)
    log.info("paged engine: %s; built in %.1f s", report.summary(), time.perf_counter() - started)
    return engine
