"""Tiny random models built from a config, for the architectures no real small model covers here."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's template, trimmed: an image part becomes <|vision_start|><|image_pad|><|vision_end|>, which the
# processor then repeats to one <|image_pad|> per merged patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONTEXT_TOKENS = 3072  # distinctive: the loader must read it from the text config


def write_tiny_qwen25_vl(folder: Path, small_model_dir: Path) -> Path:
    """A tiny random Qwen2.5-VL checkpoint laid out as on the hub: config, weights, tokenizer, processor files."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(small_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    # transformers 5.23 cannot build a Qwen2_5_VLProcessor object without torchvision (its video processor needs
    # it, and there is no CPU build), so the processor is written as its files: what a hub checkpoint holds.
    # The PIL image processor saves itself as "Qwen2VLImageProcessor"; few pixels keep the test fast.
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    start, end, image_pad, video_pad = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": CONTEXT_TOKENS,
                     # 3D rope: head_dim 16, so 8 rotary frequencies split over (t, h, w)
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id,
                     # peakier than the default 0.02, so that greedy tokens change when image positions do
                     "initializer_range": 0.1},
        vision_config={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                       "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 56, "fullatt_block_indexes": [1], "initializer_range": 0.1},
        image_token_id=image_pad, video_token_id=video_pad, vision_start_token_id=start, vision_end_token_id=end)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    return folder
