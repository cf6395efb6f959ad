"""Batched generation with Hugging Face `generate`: left padding, greedy decoding, per-row stop."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from worker.engine import GenerationOptions


class HFGenerator:
    """Callable the engine drives: prompts (token ids) in, generated token ids (EOS stripped) out."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.pad_token_id = tokenizer.pad_token_id
        eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 options: GenerationOptions = GenerationOptions()) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)  # [B, T]
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
        most_new = max(max_new_tokens)
        output = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            max_new_tokens=most_new, min_new_tokens=most_new if options.ignore_eos else 0, do_sample=False,
            repetition_penalty=options.repetition_penalty,
            pad_token_id=self.pad_token_id, eos_token_id=None if options.ignore_eos else sorted(self.eos_token_ids),
            temperature=None, top_p=None, top_k=None)
        generated = output[:, width:].tolist()  # [B, <= most_new]
        return [self._trim(row, limit, options.ignore_eos) for row, limit in zip(generated, max_new_tokens)]

    def _trim(self, token_ids: list[int], limit: int, ignore_eos: bool) -> list[int]:
        token_ids = token_ids[:limit]
        if ignore_eos:
            return token_ids
        for i, token in enumerate(token_ids):
            if token in self.eos_token_ids:
                return token_ids[:i]
        return token_ids
