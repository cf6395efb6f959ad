"""A compact forward pass of Llama-family decoders (Llama, Qwen2, Qwen2.5) over packed tokens.

Why a forward of our own rather than transformers' modules with our attention plugged in: a step's
tokens arrive packed without padding ([N], every sequence's new tokens one after the other); q/k/v
and gate/up run as one matrix product each; logits are computed only for the rows that sample (a
152 k vocabulary over a 8 k-token prefill chunk would be 5 GB of float32). The weights are the checkpoint's: they are taken
from the transformers model `worker.models.loading.load_model` loaded (hub id, local folder, packaged GGUF), and
the norms, embeddings and rotary frequencies are transformers' own, so the numbers match its `generate`.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.paged.attention import Attend, HeadShape
from worker.engine.quant import quantize, weight_bytes

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# Rope variants whose frequencies do not depend on the sequence's length: one table serves every step.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unsupported_reason(config: Any) -> str | None:
    """Why the paged engine cannot run a model of this config, or None when it can."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (the paged engine runs {', '.join(SUPPORTED_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return f"rope type {rope_type!r}"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    quantized = getattr(config, "quantization_config", None)
    if quantized:  # its layers are the quantisation library's, not nn.Linear: transformers' own forward runs them
        method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized.quant_method
        return f"a checkpoint already quantised ({method}): vLLM reads its format"
    return None


def _fuse(linears: list[nn.Linear]) -> nn.Linear:
    """One linear layer computing the given ones side by side (their outputs concatenated)."""
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(l.out_features for l in linears), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([l.weight for l in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([l.bias for l in linears]))
    return fused


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    """One transformers decoder layer taken over: q/k/v and gate/up fused, each moved to `device` and converted
    to `weight_format` there."""

    def __init__(self, hf_layer: nn.Module, heads: HeadShape, index: int, *, weight_format: str = "bf16",
                 device: torch.device | None = None) -> None:
        super().__init__()
        attention, mlp = hf_layer.self_attn, hf_layer.mlp
        self.index = index
        self.heads = heads
        self._splits = [heads.num_heads * heads.head_dim] + [heads.num_kv_heads * heads.head_dim] * 2
        qkv = _fuse([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        o_proj, down_proj = attention.o_proj, mlp.down_proj
        # The fused and converted copies replace the originals: drop those at once, so loading peaks one layer above
        # the model.
        attention.q_proj = attention.k_proj = attention.v_proj = mlp.gate_proj = mlp.up_proj = None
        attention.o_proj = mlp.down_proj = None
        self.qkv_proj = quantize(qkv.to(device), weight_format)
        self.o_proj = quantize(o_proj.to(device), weight_format)
        self.gate_up_proj = quantize(gate_up.to(device), weight_format)
        self.down_proj = quantize(down_proj.to(device), weight_format)
        self.input_layernorm = hf_layer.input_layernorm.to(device)
        self.post_attention_layernorm = hf_layer.post_attention_layernorm.to(device)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """hidden [N, D] -> [N, D]; cos, sin [N, 1, head_dim]."""
        q, k, v = self.qkv_proj(self.input_layernorm(hidden)).split(self._splits, dim=-1)
        q = q.view(-1, self.heads.num_heads, self.heads.head_dim)
        k = k.view(-1, self.heads.num_kv_heads, self.heads.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = attend(self.index, q, k, v.view(-1, self.heads.num_kv_heads, self.heads.head_dim))
        hidden = hidden + self.o_proj(out.reshape(-1, self.heads.num_heads * self.heads.head_dim))
        gate, up = self.gate_up_proj(self.post_attention_layernorm(hidden)).chunk(2, dim=-1)
        return hidden + self.down_proj(F.silu(gate) * up)


class DecoderModel(nn.Module):
    """Built from a loaded transformers `LlamaForCausalLM` / `Qwen2ForCausalLM`, whose layers it takes over.

    `device`: where it computes (default: where the checkpoint was loaded). `weight_format`: the layers'
    projections as loaded (`bf16`) or in `fp16` (FBGEMM, on a CPU), `lm_head` then too.
    """

    def __init__(self, hf_model: nn.Module, *, weight_format: str = "bf16",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        config = hf_model.config
        reason = unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"the paged engine cannot run this model: {reason}")
        base = hf_model.model
        device = torch.device(device) if device is not None else hf_model.lm_head.weight.device
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = HeadShape(config.num_attention_heads, config.num_key_value_heads, head_dim)
        self.heads = heads
        self.embed_tokens = base.embed_tokens.to(device)
        head = hf_model.lm_head.to(device)
        self.vocab_size = head.weight.shape[0]
        self._dtype = head.weight.dtype  # the activations' (fp16 weights on a CPU compute in float32)

        def take_over(numbered: tuple[int, nn.Module]) -> DecoderLayer:
            return DecoderLayer(numbered[1], self.heads, numbered[0], weight_format=weight_format, device=device)

        if weight_format == "fp16":
            # fp16 weights on a CPU convert the head too: there it is the largest product of a step. FBGEMM packs
            # outside the GIL, so two threads pack the head and the layers (an engine built 3.6 -> 2.5 s here).
            with ThreadPoolExecutor(2, thread_name_prefix="docbatch-pack") as pool:
                packed_head = pool.submit(quantize, head, weight_format)
                self.layers = nn.ModuleList(pool.map(take_over, enumerate(base.layers)))
                self.lm_head = packed_head.result()
        else:
            self.layers = nn.ModuleList(map(take_over, enumerate(base.layers)))
            self.lm_head = head
        self.norm = base.norm.to(device)
        self.weight_format = weight_format
        self.max_model_len = int(config.max_position_embeddings)
        cos, sin = _rope_table(base.rotary_emb.to(device), self.max_model_len, self._dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.requires_grad_(False)  # inference only

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def weight_bytes(self) -> int:
        """Device memory the weights take, in their format (the rope tables included)."""
        return weight_bytes(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: Attend) -> torch.Tensor:
        """input_ids, positions [N] -> hidden states [N, D] before the final norm."""
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attend)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, D] of the sampled rows -> float32 logits [S, vocab]."""
        return self.lm_head(self.norm(hidden)).float()


def _rope_table(rotary: nn.Module, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] computed as transformers' rotary embedding computes them per step."""
    inv_freq = rotary.inv_freq.float()
    freqs = torch.arange(length, device=inv_freq.device).float()[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return (angles.cos() * rotary.attention_scaling).to(dtype), (angles.sin() * rotary.attention_scaling).to(dtype)
