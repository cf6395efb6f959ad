"""Batched generation with Hugging Face `generate`: left padding, greedy or sampled decoding, per-row stop."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from worker.engine.grammar import GrammarCache, SchemaLogitsProcessor
from worker.engine.request import GenerationOptions, ModelInput


def collate(inputs: Sequence[ModelInput], pad_token_id: int,
            mm_token_types: Mapping[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Left-pad token ids into one batch; concatenate per-row extras (image patches) along dim 0.

    `mm_token_types` maps a vision model's placeholder token ids to their modality (image 1, video 2).
    When given and some row has extras, the batch also gets `mm_token_type_ids` [B, T] (0 on text and
    padding): without it transformers 5.x's Qwen2-VL/2.5-VL silently gives image tokens 1D positions
    instead of their 3D (t, h, w) rope.
    """
    width = max(len(i.token_ids) for i in inputs)
    input_ids = torch.full((len(inputs), width), pad_token_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(inputs), width), dtype=torch.long)  # [B, T]
    for row, model_input in enumerate(inputs):
        input_ids[row, width - len(model_input.token_ids):] = torch.tensor(model_input.token_ids, dtype=torch.long)
        attention_mask[row, width - len(model_input.token_ids):] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    for key in sorted({k for i in inputs for k in i.extras}):
        # e.g. pixel_values [sum of patches, D] and image_grid_thw [images, 3]: rows without images add nothing.
        # Qwen-VL takes exactly this: the vision tower runs on all patches at once and its features fill the
        # image placeholders in row-major order, which is the order of this concatenation.
        batch[key] = torch.cat([i.extras[key] for i in inputs if key in i.extras], dim=0)
    if mm_token_types and any(i.extras for i in inputs):
        mm_token_type_ids = torch.zeros_like(input_ids)  # [B, T]
        for token_id, modality in mm_token_types.items():
            mm_token_type_ids[input_ids == token_id] = modality
        batch["mm_token_type_ids"] = mm_token_type_ids
    return batch


def vision_token_types(config: Any) -> dict[int, int]:
    """Placeholder token id -> modality (1 image, 2 video) of a vision-language config; empty for text models."""
    types = {}
    for attribute, modality in (("image_token_id", 1), ("video_token_id", 2)):
        if (token_id := getattr(config, attribute, None)) is not None:
            types[token_id] = modality
    return types


class HFGenerator:
    """Callable the engine drives: prompts in, generated token ids (EOS stripped) out."""

    def __init__(self, model: Any, tokenizer: Any, eos_token_ids: frozenset[int]) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._grammars: GrammarCache | None = None  # built on the first constrained request
        self.pad_token_id = tokenizer.pad_token_id
        self.mm_token_types = vision_token_types(model.config)
        self.eos_token_ids = eos_token_ids

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def __call__(self, inputs: Sequence[ModelInput], max_new_tokens: Sequence[int],
                 options: GenerationOptions = GenerationOptions()) -> list[list[int]]:
        batch = {k: v.to(self.device) for k, v in collate(inputs, self.pad_token_id, self.mm_token_types).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        width = batch["input_ids"].shape[1]
        most_new = max(max_new_tokens)
        # The schema mask runs before temperature and top-p, so sampling only ever sees allowed tokens.
        processors = [self._schema_processor(inputs, width)] if any(i.json_schema for i in inputs) else []
        sample = options.temperature > 0
        output = self.model.generate(
            **batch, max_new_tokens=most_new, min_new_tokens=most_new if options.ignore_eos else 0,
            do_sample=sample, repetition_penalty=options.repetition_penalty, pad_token_id=self.pad_token_id,
            eos_token_id=None if options.ignore_eos else sorted(self.eos_token_ids),
            temperature=options.temperature if sample else None, top_p=options.top_p if sample else None,
            top_k=None, logits_processor=processors)
        generated = output[:, width:].tolist()  # [B, <= most_new]
        return [self._trim(row, limit, options.ignore_eos) for row, limit in zip(generated, max_new_tokens)]

    def _schema_processor(self, inputs: Sequence[ModelInput], width: int) -> SchemaLogitsProcessor:
        if self._grammars is None:
            vocab_size = self.model.get_output_embeddings().out_features  # an Fp16Linear has no weight
            self._grammars = GrammarCache(self.tokenizer, vocab_size)
        matchers = [self._grammars.matcher(i.json_schema) if i.json_schema else None for i in inputs]
        return SchemaLogitsProcessor(matchers, width, self._grammars.vocab_size)

    def _trim(self, token_ids: list[int], limit: int, ignore_eos: bool) -> list[int]:
        token_ids = token_ids[:limit]
        if ignore_eos:
            return token_ids
        for i, token in enumerate(token_ids):
            if token in self.eos_token_ids:
                return token_ids[:i]
        return token_ids
