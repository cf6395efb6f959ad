"""Model loading: a hub id, a local folder, or the packaged SmolLM2-135M-Instruct (`worker/models/source.py`).

bf16 on a GPU and on CPUs with bfloat16 instructions, fp16 weights computed in float32 on other
x86 CPUs, float32 elsewhere (`dtype`); `sdpa` attention unless configured otherwise. A Qwen2-VL or
Qwen2.5-VL folder loads as an image-text model with its processor (`worker/models/vision.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.settings import Settings


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel; None where the engine loads the weights itself (vLLM)
    tokenizer: Any  # a transformers tokenizer, left padding (a vision model's: its processor's tokenizer)
    device: str  # "cuda" or "cpu"
    processor: Any = None  # a vision model's processor (images + chat template); None for a text model
    # dtype float16 on a CPU: the model is loaded in float32, and the engine that runs it keeps its linear
    # layers' weights in fp16 (FBGEMM), computing in float32
    cpu_fp16: bool = False
    config: Any = None  # the transformers config
    source: str = ""  # where the weights are: a hub id or a folder
    generation_config: Any = None  # transformers' GenerationConfig: the model's EOS tokens

    @property
    def precision(self) -> str:
        """What the model computes in, for the logs."""
        if self.model is None:
            return "the dtype its engine loads it in"
        if self.cpu_fp16:
            return "float16 weights (FBGEMM), float32 activations"
        return str(self.model.dtype).removeprefix("torch.")

    def hf_engine_model(self) -> Any:
        """The transformers model as the hf engine runs it: for dtype float16 on a CPU its linear layers become
        fp16 in place (the paged engine, which takes the layers over and converts them itself, cannot be built
        from it afterwards)."""
        if self.cpu_fp16:
            from worker.engine.quant import fp16_linears

            fp16_linears(self.model)
        return self.model

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokens that end an answer: the generation config's, else the tokenizer's EOS."""
        generation = self.model.generation_config if self.model is not None else self.generation_config
        eos = getattr(generation, "eos_token_id", None) or self.tokenizer.eos_token_id
        return frozenset(eos if isinstance(eos, list) else [eos]) if eos is not None else frozenset()

    @property
    def is_vision(self) -> bool:
        return self.processor is not None

    @property
    def context_tokens(self) -> int:
        from worker.models.info import context_tokens

        return context_tokens(self.config)


def pick_device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def model_dtype(setting: str, device: str):
    """The torch dtype of the model's weights: the setting's, or for `auto` bfloat16 on a GPU and on a CPU that
    multiplies bfloat16 natively, float16 on other CPUs where FBGEMM runs (x86 with AVX2: its fp16 kernels
    compute in float32, a decode step 1.5 times as fast as float32's there), float32 elsewhere."""
    import torch

    from worker.engine.quant import fbgemm_available

    if setting != "auto":
        return getattr(torch, setting)
    if device == "cuda" or cpu_has_bf16():
        return torch.bfloat16
    return torch.float16 if fbgemm_available() else torch.float32


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bfloat16 instructions (x86 AVX512-BF16 or AMX, Arm BF16), from Linux's /proc/cpuinfo.
    Without them PyTorch emulates bfloat16 products, slower than float32's."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def load_model(settings: Settings, *, weights: bool = True) -> LoadedModel:
    """Load `settings.model` once for this process, for the device `settings.device` resolves to: its config,
    tokenizer (and a vision model's processor), and unless `weights` is False (vLLM loads them itself: one copy)
    its weights through transformers (for the paged and hf engines)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from worker.engine.quant import fbgemm_available
    from worker.models.source import model_source
    from worker.models.vision import is_vision_config, load_processor

    device = pick_device(settings.device)
    source = model_source(settings)
    config = AutoConfig.from_pretrained(source)
    processor = load_processor(str(source), config) if is_vision_config(config) else None
    # a vision model's tokenizer is its processor's (the same object: the processor then pads left too)
    tokenizer = prepare_tokenizer(processor.tokenizer if processor else AutoTokenizer.from_pretrained(source))
    if not weights:
        return LoadedModel(None, tokenizer, device, processor, config=config, source=source,
                           generation_config=_generation_config(source, config))
    dtype = model_dtype(settings.dtype, device)
    cpu_fp16 = device == "cpu" and dtype == torch.float16
    if cpu_fp16:
        if not fbgemm_available():
            raise ValueError("dtype float16 on a CPU needs FBGEMM (PyTorch on x86 with AVX2): use float32")
        dtype = torch.float32
    # A worker that owns several GPUs (CUDA_VISIBLE_DEVICES=0,1) shards the model across them by layers.
    device_map = "auto" if device == "cuda" and torch.cuda.device_count() > 1 else device
    options = {"dtype": dtype, "device_map": device_map, "attn_implementation": settings.attn_implementation}
    if settings.gpu_weights_gb and device == "cuda":
        # What does not fit stays in CPU memory: accelerate copies it to the GPU at every forward pass.
        options.update(device_map="auto", max_memory={**{gpu: f"{settings.gpu_weights_gb}GiB" for gpu in
                                                          range(torch.cuda.device_count())}, "cpu": _host_memory()})
    auto_model = AutoModelForImageTextToText if processor else AutoModelForCausalLM
    model = auto_model.from_pretrained(source, **options)
    model.eval()
    return LoadedModel(model, tokenizer, device, processor, cpu_fp16=cpu_fp16, config=model.config, source=source)


def _generation_config(source: str, config: Any) -> Any:
    """The model's generation config (its EOS tokens), read without its weights."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except OSError:  # a checkpoint without generation_config.json: what its config says
        return GenerationConfig.from_model_config(config)


def _host_memory() -> int:
    """Bytes of this machine's memory: what accelerate may fill with offloaded weights."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (generation continues from the right edge) and a pad token where the model has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
