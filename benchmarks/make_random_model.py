"""Write a random-weight model with Qwen2.5-7B-Instruct's exact shape to a folder (no hub needed); with `--vision`,
Qwen2.5-VL-7B-Instruct's (the same language model behind a 32-block vision encoder).

    python benchmarks/make_random_model.py --tokenizer-from DIR --out /tmp/qwen7b-random [--vision | --awq]

Weights are random, so answers are noise, but the compute and memory traffic per token are the real
ones. The tokenizer (and its chat template) comes from `--tokenizer-from`, e.g. the converted
SmolLM2 folder; its ids all lie inside Qwen's vocabulary. A vision model gets Qwen's vision tokens added to it, a
chat template that places images, and the image processor's files with Qwen2.5-VL's pixel limits. With `--awq`, the
checkpoint a 24 GB card runs (as Qwen2.5-7B-Instruct-AWQ is published): the decoder's linear layers in AutoAWQ's
GEMM format (4-bit weights packed eight to an int32, a zero point and an fp16 scale per 128 inputs), the rest fp16.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import CHAT_TEMPLATE, VISION_TOKENS  # noqa: E402 - Qwen VL's template and tokens, one copy

QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)
# Qwen2.5-VL-7B-Instruct's vision encoder
QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31], in_chans=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-from", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--vision", action="store_true", help="Qwen2.5-VL-7B's shape")
    kind.add_argument("--awq", action="store_true", help="4-bit AWQ weights (AutoAWQ's GEMM format)")
    args = parser.parse_args()
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_from)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if args.vision:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
        tokenizer.chat_template = CHAT_TEMPLATE
        start, end, image_pad, video_pad = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
        text = {**QWEN25_7B, **ids, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                        "mrope_section": [16, 24, 24]}}
        text.pop("rope_theta")
        config = Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25_VL_VISION, image_token_id=image_pad,
                                  video_token_id=video_pad, vision_start_token_id=start, vision_end_token_id=end,
                                  tie_word_embeddings=False)
        make = Qwen2_5_VLForConditionalGeneration
    elif args.awq:
        config = Qwen2Config(**QWEN25_7B, **ids)
        params = write_awq(config, args.out)
        tokenizer.save_pretrained(args.out)
        print(f"wrote {args.out}: {params / 1e9:.2f} B parameters (AWQ 4-bit) in {time.time() - started:.0f} s")
        return
    else:
        config, make = Qwen2Config(**QWEN25_7B, **ids), Qwen2ForCausalLM
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = make(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    if args.vision:  # the processor's files, as a hub checkpoint holds them: Qwen2.5-VL's own pixel limits
        (args.out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        (args.out / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True}))
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"wrote {args.out}: {params:.2f} B parameters in {time.time() - started:.0f} s", flush=True)


AWQ_GROUP = 128  # inputs per scale and zero point
AWQ_ZEROS = -0x77777778  # eight 4-bit zero points of 8 in one int32 (0x88888888)


def write_awq(config: Qwen2Config, out: Path) -> int:
    """A random Qwen2 checkpoint of `config`'s shape in AutoAWQ's GEMM format (`qweight` [in, out / 8] int32,
    `qzeros` [in / 128, out / 8] int32, `scales` [in / 128, out] fp16 for q/k/v/o and gate/up/down; embeddings,
    norms, q/k/v biases and the head in fp16), with the `quantization_config` vLLM reads. Returns its parameters."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hidden, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    # a weight (q - 8) * scale has the standard deviation of the bf16 model's initialiser (0.02)
    scale = config.initializer_range / 4.6
    tensors: dict[str, torch.Tensor] = {}

    def dense(name: str, *shape: int) -> None:
        tensors[name] = (torch.randn(*shape) * config.initializer_range).half()

    def awq(name: str, inputs: int, outputs: int) -> None:
        tensors[f"{name}.qweight"] = torch.randint(-2**31, 2**31 - 1, (inputs, outputs // 8), dtype=torch.int32)
        tensors[f"{name}.qzeros"] = torch.full((inputs // AWQ_GROUP, outputs // 8), AWQ_ZEROS, dtype=torch.int32)
        tensors[f"{name}.scales"] = torch.full((inputs // AWQ_GROUP, outputs), scale, dtype=torch.float16)

    dense("model.embed_tokens.weight", config.vocab_size, hidden)
    dense("lm_head.weight", config.vocab_size, hidden)
    tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.float16)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{layer}.{norm}.weight"] = torch.ones(hidden, dtype=torch.float16)
        for proj, outputs in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
            awq(f"{layer}.self_attn.{proj}", hidden, outputs)
            tensors[f"{layer}.self_attn.{proj}.bias"] = torch.zeros(outputs, dtype=torch.float16)
        awq(f"{layer}.self_attn.o_proj", hidden, hidden)
        awq(f"{layer}.mlp.gate_proj", hidden, config.intermediate_size)
        awq(f"{layer}.mlp.up_proj", hidden, config.intermediate_size)
        awq(f"{layer}.mlp.down_proj", config.intermediate_size, hidden)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config.dtype = torch.float16
    config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": AWQ_GROUP, "zero_point": True,
                                  "version": "gemm"}
    config.save_pretrained(out)
    return sum(t.numel() * (8 if n.endswith(".qweight") else 1) for n, t in tensors.items())


if __name__ == "__main__":
    main()
