"""Weight formats of the paged engine's projections (`weight_format`): what each linear layer becomes.

- `bf16`: the weights as loaded (bf16 on a GPU, float32 on a CPU).
- `int8`: int8 weights, one scale per output channel; each token's activations are quantised to int8 at
  run time (one scale per token) and multiplied on int8 tensor cores (`torch._int_mm`), then rescaled.
- `fp8`: the same scheme in float8 e4m3 through `torch._scaled_mm` (GPUs of compute capability 8.9 or
  newer: Ada, Hopper; PyTorch's own kernel on a CPU).
- `fp16` (a CPU only, what `dtype=float16` means there): half-precision weights multiplied by FBGEMM's
  fp16 GEMM into float32 (activations stay float32). It halves the bytes a decode step reads and, on an AVX2
  CPU at 11 rows, takes 0.25 against float32's 0.61 ms for one gate/up product, 5.7 against 31 ms for
  SmolLM2's `lm_head`, which this format converts too.
- `nf4`: bitsandbytes' 4-bit NormalFloat, blocks of 64 weights, the block scales quantised again (double
  quantisation); products through `bitsandbytes.matmul_4bit`, which de-quantises to the activations' dtype
  for a batch (a fused 4-bit kernel only for a single row).

Only the four projections of each layer (q/k/v, o, gate/up, down: 86 % of Qwen2.5-7B's weights) change
(and, for `fp16`, `lm_head`); embeddings and norms stay as loaded. Every GPU format here is made of kernels
a CUDA graph captures.
Why activations are quantised for int8 and fp8 rather than weights de-quantised: on an H200, at 256 decode
rows, one gate/up product of Qwen2.5-7B took 0.35 ms in int8 x int8 and 0.78 ms de-quantising int8 to bf16
first (0.11 ms in bf16; `benchmarks/quant_kernels.py`). These formats save memory; none is faster than bf16
at decode there.
"""
from __future__ import annotations

import torch
from torch import nn

WEIGHT_FORMATS = ("bf16", "int8", "fp8", "nf4")  # what `weight_format` may ask for; `fp16` comes from `dtype`
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0  # largest finite float8 e4m3 value
INT8_MAX = 127.0
NF4_BLOCK = 64
MIN_SCALE = 1e-12  # an all-zero row or token keeps a finite scale
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA wants more than 16 rows


def check_weight_format(weight_format: str, device: str) -> None:
    """Raise at start-up, before any weight loads, when `weight_format` cannot run on `device`."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format {weight_format!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    if weight_format == "fp8" and device == "cuda":
        capability = torch.cuda.get_device_capability()
        if capability < (8, 9):
            raise ValueError(f"weight_format fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"this one is {capability[0]}.{capability[1]}: use int8 or nf4")
    if weight_format == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ValueError("weight_format nf4 needs bitsandbytes: pip install 'docbatch[quant]'") from error


def check_kv_cache_dtype(kv_cache_dtype: str, device: str) -> None:
    """Raise at start-up when the KV cache cannot be stored in `kv_cache_dtype` on `device`."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
    if kv_cache_dtype == "fp8" and device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        raise ValueError("kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper)")


def quantize(linear: nn.Linear, weight_format: str) -> nn.Module:
    """`linear` in `weight_format` (the same module for bf16); it computes on the device `linear` is on."""
    if weight_format == "bf16":
        return linear
    return {"int8": Int8Linear, "fp8": Fp8Linear, "nf4": Nf4Linear, "fp16": Fp16Linear}[weight_format](linear)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every tensor `module` holds: parameters, buffers and nf4's quantisation state."""
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [t for m in module.modules() if isinstance(m, Nf4Linear) for t in m.state_tensors()]
    packed = sum(m.packed_bytes for m in module.modules() if isinstance(m, Fp16Linear))
    return packed + sum(t.numel() * t.element_size() for t in tensors)


def _per_row_scale(x: torch.Tensor, largest: float) -> torch.Tensor:
    """[rows, 1] float32 scales mapping each row's largest magnitude to `largest`."""
    return x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_SCALE) / largest


class _RowScaledLinear(nn.Module):
    """Weights [out, in] stored in a narrow type with one float32 scale per output channel ([1, out])."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, largest: float) -> None:
        super().__init__()
        weight = linear.weight.detach()
        if weight.is_cuda and (weight.shape[0] % 16 or weight.shape[1] % 16):
            raise ValueError(f"{type(self).__name__} needs both weight dimensions divisible by 16 on a GPU: "
                             f"{tuple(weight.shape)}")
        scale = _per_row_scale(weight, largest)
        quantized = weight.float() / scale
        if dtype == torch.int8:
            quantized = quantized.round().clamp(-INT8_MAX, INT8_MAX)
        self.register_buffer("weight", quantized.to(dtype))
        self.register_buffer("weight_scale", scale.view(1, -1).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def _finish(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = out.to(dtype)
        return out if self.bias is None else out + self.bias


class Int8Linear(_RowScaledLinear):
    """y = round(x / sx) @ W8ᵀ · sx · sw (+ b): int8 weights per channel, activations per token (dynamic)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, torch.int8, INT8_MAX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] -> [N, out] in x's dtype."""
        rows = x.shape[0]
        x_scale = _per_row_scale(x, INT8_MAX)
        x_int8 = (x.float() / x_scale).round().to(torch.int8)
        if x.is_cuda and rows < INT_MM_MIN_ROWS:
            x_int8 = nn.functional.pad(x_int8, (0, 0, 0, INT_MM_MIN_ROWS - rows))
        product = torch._int_mm(x_int8, self.weight.t())[:rows]  # int32, exact
        return self._finish(product.float() * x_scale * self.weight_scale, x.dtype)


class Fp8Linear(_RowScaledLinear):
    """y = fp8(x / sx) @ fp8(W / sw)ᵀ · sx · sw (+ b), the scales applied inside `torch._scaled_mm`."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear, torch.float8_e4m3fn, FP8_MAX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] -> [N, out] in x's dtype."""
        x_scale = _per_row_scale(x, FP8_MAX)
        x_fp8 = (x.float() / x_scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=x.dtype)
        return self._finish(out, x.dtype)


class Nf4Linear(nn.Module):
    """bitsandbytes NF4 with double quantisation: 4 bits a weight, one uint8 scale per 64 (itself scaled in
    float32 per 256 blocks)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        import bitsandbytes.functional as bnb_functional

        packed, self.state = bnb_functional.quantize_4bit(linear.weight.detach(), blocksize=NF4_BLOCK,
                                                          quant_type="nf4", compress_statistics=True)
        self.register_buffer("weight", packed)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def state_tensors(self) -> list[torch.Tensor]:
        """The quantisation state's tensors (block scales, their scales, the code book)."""
        state = self.state
        return [state.absmax, state.code, *([state.state2.absmax, state.state2.code, state.offset]
                                           if state.nested else [])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] -> [N, out] in x's dtype."""
        import bitsandbytes

        return bitsandbytes.matmul_4bit(x, self.weight.t(), quant_state=self.state, bias=self.bias)


def fbgemm_available() -> bool:
    """Whether FBGEMM's kernels run here (PyTorch's x86 builds, on a CPU with AVX2)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


class Fp16Linear(nn.Module):
    """y = x @ fp16(W)ᵀ + b on a CPU: FBGEMM's packed half-precision weights, float32 in and out."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.weight.device.type != "cpu" or not fbgemm_available():
            raise ValueError("fp16 weights run on a CPU with FBGEMM (x86 with AVX2)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        self.packed_bytes = 2 * self.in_features * self.out_features + (0 if bias is None else 4 * self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] float32 -> [N, out] float32."""
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def fp16_linears(model: nn.Module) -> None:
    """Make every `nn.Linear` of a CPU model an `Fp16Linear`, in place (what the hf engine runs for dtype
    float16 on a CPU)."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, Fp16Linear(child))
        else:
            fp16_linears(child)
