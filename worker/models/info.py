"""What the prepare stage needs to know of the configured model without loading its weights:
whether it reads images, its context length, and its tokenizer (to count and chunk)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from schemas.settings import Settings
from worker.models.source import model_source

# Qwen2-VL / Qwen2.5-VL: 14-pixel patches merged 2 x 2, so one image token per 28 x 28 pixels.
VISION_PIXELS_PER_TOKEN_SIDE = 28


@dataclass(frozen=True)
class ModelInfo:
    is_vision: bool
    context_tokens: int
    tokenizer: Any

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def image_tokens(width: int, height: int) -> int:
        side = VISION_PIXELS_PER_TOKEN_SIDE
        return math.ceil(width / side) * math.ceil(height / side) + 2  # + vision start/end markers


def context_tokens(config: Any) -> int:
    """The context length; a vision-language config keeps its language model's in `text_config`."""
    text_config = getattr(config, "text_config", None) or config
    return int(getattr(text_config, "max_position_embeddings", 0) or 4096)


@functools.lru_cache(maxsize=4)
def model_info(settings: Settings) -> ModelInfo:
    """Config and tokenizer of the configured model, read once per process."""
    from transformers import AutoConfig, AutoTokenizer

    from worker.models.vision import is_vision_config

    source = model_source(settings)
    config = AutoConfig.from_pretrained(source)
    return ModelInfo(is_vision_config(config), context_tokens(config), AutoTokenizer.from_pretrained(source))


def input_budget(settings: Settings, context_tokens: int) -> int:
    """Prompt tokens a request may have: configured, or the context (`max_model_len` where set lower) minus the
    answer's room."""
    context = min(context_tokens, settings.max_model_len) if settings.max_model_len else context_tokens
    return settings.max_input_tokens or context - settings.max_new_tokens
