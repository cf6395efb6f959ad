"""Which engine a worker runs (`DOCBATCH_ENGINE`), and building it around the loaded model.

`vllm` runs on a GPU (and on a CPU with vLLM's CPU build): every architecture and checkpoint format vLLM reads,
image-text models included; it loads the weights itself, so the worker loads only the tokenizer and processor
(`uses_vllm` tells before anything is loaded). `paged` (continuous batching over a paged KV cache) runs every text
model of the Llama family (Llama, Qwen2, Qwen2.5) on one device or over a tensor-parallel group; `hf` (static
batches through transformers' `generate`) runs the rest, image-text models on a CPU included, and stays as the
reference the tests compare the paged engine with. `auto` picks `vllm` on a GPU where vLLM is installed, else
`paged` wherever it can.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from schemas.settings import Settings
from worker.engine.request import ModelInput

log = logging.getLogger(__name__)

GIB = 1024 ** 3
CPU_KV_CACHE_BYTES = 1 * GIB  # the default on a CPU, where memory is not measured
GRAPH_RESERVE_BYTES = GIB // 2  # activations of the captured decode graphs, taken after the KV cache


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
    if settings.weight_format == "int8":
        raise ValueError("vLLM quantises weights online to fp8 or nf4 (bitsandbytes), not int8: set weight_format "
                         "fp8 or nf4, or use an int8 (W8A8) checkpoint, whose format vLLM reads from it")
    on_cpu = loaded.device == "cpu"
    args: dict[str, Any] = dict(
        model=loaded.source, tokenizer=loaded.source, dtype=settings.dtype, seed=0,
        max_num_seqs=settings.max_batch_size, max_num_batched_tokens=settings.max_step_tokens or None,
        gpu_memory_utilization=settings.gpu_memory_utilization, enable_prefix_caching=True,
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

    if loaded.is_vision:
        return "image-text models run on the hf engine"
    if len({str(d) for d in (getattr(loaded.model, "hf_device_map", None) or {}).values()}) > 1:
        return "the model is split over several devices (GPUs, or a GPU and CPU memory)"
    return unsupported_reason(loaded.model.config)


def engine_kind(settings: Settings, loaded: Any) -> str:
    """`paged` or `hf`; ValueError where the settings ask for what the engine that would run cannot do."""
    reason = "DOCBATCH_ENGINE=hf" if settings.engine == "hf" else paged_unsupported(loaded)
    if reason is None:
        return "paged"
    if settings.engine == "paged":
        raise ValueError(f"DOCBATCH_ENGINE=paged cannot run {settings.model}: {reason}")
    if settings.weight_format != "bf16" or settings.kv_cache_dtype != "auto":
        raise ValueError(f"weight_format {settings.weight_format} and kv_cache_dtype {settings.kv_cache_dtype} apply "
                         f"to the paged engine, which cannot run {settings.model}: {reason}")
    log.info("the hf engine runs %s: %s", settings.model, reason)
    return "hf"


def build_engine(settings: Settings, loaded: Any, tp: Any = None) -> Any:
    """The started engine for `loaded` (a `worker.models.loading.LoadedModel`), paged or hf. `tp` (a
    `worker.engine.paged.tensor_parallel.TensorParallel`): this process leads a tensor-parallel group, whose other
    ranks call `run_follower` with the same settings and model."""
    if uses_vllm(settings):
        return _vllm(settings, loaded)
    if tp is not None:
        return _paged(settings, loaded, tp).start()
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


def run_follower(settings: Settings, loaded: Any, tp: Any) -> int:
    """A tensor-parallel rank other than the leader: build this rank's shard and KV cache, then run every step
    the leader sends until it stops. Returns the number of steps run."""
    from worker.engine.paged.tensor_parallel import follow

    parts = _PagedParts.build(settings, loaded, tp)
    return follow(parts.model, parts.attention, tp)


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


@dataclass
class _PagedParts:
    """What every rank of a paged engine builds alike: its model (or shard), KV cache and attention."""

    model: Any
    cache: Any
    attention: Any
    workspace: Any  # FlashInfer's scratch buffer, or None

    @classmethod
    def build(cls, settings: Settings, loaded: Any, tp: Any = None) -> "_PagedParts":
        import torch

        from worker.engine.paged.attention import WORKSPACE_BYTES, FlashInferAttention, TorchAttention, flashinfer_available
        from worker.engine.paged.kv_cache import CacheShape, KVCache
        from worker.engine.paged.model import DecoderModel
        from worker.engine.quant import KV_CACHE_DTYPES

        weight_format = "fp16" if loaded.cpu_fp16 and settings.weight_format == "bf16" else settings.weight_format
        model = DecoderModel(loaded.model, weight_format=weight_format, device=loaded.device, tp=tp)
        shape = CacheShape(len(model.layers), model.heads.num_kv_heads, model.heads.head_dim, settings.kv_block_tokens,
                           KV_CACHE_DTYPES[settings.kv_cache_dtype] or model.dtype)
        on_gpu = model.device.type == "cuda"
        use_flashinfer = on_gpu and flashinfer_available()
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=model.device) if use_flashinfer else None

        def attention_over(cache: KVCache) -> Any:
            if use_flashinfer:
                return FlashInferAttention(cache, model.heads, workspace, model.dtype)
            return TorchAttention(cache, model.heads)

        if on_gpu:
            from worker.engine.paged.memory import gpu_kv_bytes

            kv_bytes = settings.kv_cache_gb * GIB or gpu_kv_bytes(model, shape, attention_over, settings,
                                                                  reserve_bytes=GRAPH_RESERVE_BYTES)
        else:
            kv_bytes = settings.kv_cache_gb * GIB or CPU_KV_CACHE_BYTES
        num_blocks = shape.blocks_in(kv_bytes)
        if tp is not None:  # one set of block tables serves every rank: the smallest cache sets the size
            num_blocks = tp.agree_on_min(num_blocks)
        cache = KVCache(shape, num_blocks, model.device)
        return cls(model, cache, attention_over(cache), workspace)


def _paged(settings: Settings, loaded: Any, tp: Any = None) -> Any:
    from worker.engine.paged.block_manager import BlockManager
    from worker.engine.paged.cuda_graphs import DecodeGraphs
    from worker.engine.grammar import GrammarCache
    from worker.engine.paged.memory import MemoryReport
    from worker.engine.paged.engine import PagedEngine
    from worker.engine.paged.runner import ModelRunner
    from worker.engine.paged.scheduler import DEFAULT_MAX_STEP_TOKENS, Scheduler

    started = time.perf_counter()
    parts = _PagedParts.build(settings, loaded, tp)
    model, cache, attention = parts.model, parts.cache, parts.attention
    runner = ModelRunner(model, cache, attention, max_num_seqs=settings.max_batch_size, tp=tp)
    # Under tensor parallelism every rank would have to replay its own graph in step: not done yet, so eager.
    if parts.workspace is not None and settings.cuda_graphs and tp is None:
        runner.graphs = DecodeGraphs(model, attention, parts.workspace, max_batch_size=settings.max_batch_size)
    scheduler = Scheduler(BlockManager(cache.num_blocks, cache.shape.block_size), max_num_seqs=settings.max_batch_size,
                          max_step_tokens=settings.max_step_tokens or DEFAULT_MAX_STEP_TOKENS,
                          max_model_len=model.max_model_len)
    engine = PagedEngine(runner, scheduler, eos_token_ids=loaded.eos_token_ids,
                         grammars=lambda: GrammarCache(loaded.tokenizer, model.vocab_size))
    report = MemoryReport.of(model, cache)
    report.record(engine.stats)
    ranks = "" if tp is None else f", rank 0 of {tp.world_size} (tensor parallel; figures per rank)"
    log.info("paged engine: %s; attention %s, CUDA graphs %s%s; built in %.1f s", report.summary(), attention.name,
             "on" if runner.graphs is not None else "off", ranks, time.perf_counter() - started)
    return engine
