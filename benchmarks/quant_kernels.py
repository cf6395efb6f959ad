"""What one linear layer of Qwen2.5-7B's shape costs in each weight format on a GPU, by rows (tokens).

    python benchmarks/quant_kernels.py --rows 1,16,64,256,1024,8192 --out /tmp/kernels.json

The candidates the paged engine could use, timed with CUDA events (median of 50 after a warm-up),
each compared with the bf16 product by ||out - ref|| / ||ref|| on random inputs:
  bf16        F.linear
  int8_pack   torch._weight_int8pack_mm (weight-only int8, per-channel scales, bf16 activations)
  int8_deq    int8 weights converted to bf16 then F.linear
  int8_w8a8   torch._int_mm on int8 activations (per-token scales) and weights, then the scales
  fp8         torch._scaled_mm, e4m3 weights (per-channel scales) and activations (per-token scales)
  nf4         bitsandbytes' matmul_4bit, NF4 blocks of 64 with double-quantised scales
Also says, per candidate, whether it can be captured in a CUDA graph and replayed.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from engine_steps import timed_ms  # noqa: E402 - this folder is on the path of a script run from it

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
FP8_MAX = 448.0


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127
    return (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def candidates(w: torch.Tensor) -> dict:
    """name -> callable(x) for the weight w [N, K] in each format."""
    q8, s8 = int8_weight(w)
    s8_bf16 = s8.to(w.dtype)
    s8_row = s8[None, :]
    wf8_scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / FP8_MAX
    wf8 = (w.float() / wf8_scale[:, None]).to(torch.float8_e4m3fn)
    wf8_scale_row = wf8_scale[None, :].contiguous()

    def w8a8(x):
        xs = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        xq = (x.float() / xs).round().to(torch.int8)
        rows = xq.shape[0]
        if rows <= 16:  # _int_mm needs more than 16 rows on CUDA
            xq = F.pad(xq, (0, 0, 0, 17 - rows))
        return (torch._int_mm(xq, q8.t())[:rows].float() * xs * s8_row).to(x.dtype)

    def fp8(x):
        xs = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / FP8_MAX
        xq = (x.float() / xs).to(torch.float8_e4m3fn)
        return torch._scaled_mm(xq, wf8.t(), scale_a=xs, scale_b=wf8_scale_row, out_dtype=x.dtype)

    out = {"bf16": lambda x: F.linear(x, w),
           "int8_pack": lambda x: torch._weight_int8pack_mm(x, q8, s8_bf16),
           "int8_deq": lambda x: F.linear(x, q8.to(x.dtype) * s8_bf16[:, None]),
           "int8_w8a8": w8a8, "fp8": fp8}
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        q4, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        out["nf4"] = lambda x: bnb.matmul_4bit(x, q4.t(), quant_state=state)
    except ImportError as error:
        print(json.dumps({"nf4": f"bitsandbytes missing: {error}"}))
    return out


def graph_ok(run, x: torch.Tensor, expected: torch.Tensor) -> bool | str:
    """Whether `run(x)` captured in a CUDA graph replays to what it gives eagerly."""
    try:
        run(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(x)
        graph.replay()
        torch.cuda.synchronize()
        return bool(torch.equal(out, expected))
    except Exception as error:  # noqa: BLE001 - a benchmark reports what failed and goes on
        return f"{type(error).__name__}: {error}"[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16,64,256,1024,8192")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    for layer, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for name, run in candidates(w).items():
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
                ref = F.linear(x.float(), w.float())
                row = {"layer": layer, "format": name, "rows": rows}
                try:
                    out = run(x)
                    row["rel_err"] = round(((out.float() - ref).norm() / ref.norm()).item(), 5)
                    row["ms"] = round(timed_ms(lambda: run(x)), 4)
                    if rows in (1, 256):
                        row["graph"] = graph_ok(run, x, run(x))
                except Exception as error:  # noqa: BLE001 - a benchmark reports what failed and goes on
                    row["error"] = f"{type(error).__name__}: {error}"[:200]
                print(json.dumps(row), flush=True)
                results.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
