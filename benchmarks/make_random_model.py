"""Write a random-weight model with Qwen2.5-7B-Instruct's exact shape to a folder (no hub needed).

    python benchmarks/make_random_model.py --tokenizer-from DIR --out /tmp/qwen7b-random

Weights are random, so answers are noise, but the compute and memory traffic per token are the real
ones. The tokenizer (and its chat template) comes from `--tokenizer-from`, e.g. the converted
SmolLM2 folder; its ids all lie inside Qwen's vocabulary.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-from", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_from)
    config = Qwen2Config(**QWEN25_7B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"wrote {args.out}: {params:.2f} B parameters in {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
