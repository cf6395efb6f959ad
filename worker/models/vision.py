"""The vision-language path (Qwen2-VL, Qwen2.5-VL): page images and text in one chat-templated prompt.

A prompt is built here, once per job, into a `ModelInput`: token ids with every image already expanded
into its `<|image_pad|>` placeholders, the image tensors as `extras` (`pixel_values` [patches, C*T*P*P],
`image_grid_thw` [images, 3]) for the hf engine, and the images themselves (`images`) for vLLM, whose own processor
makes its tensors (the same resize: the images are within both processors' pixel limits).
`worker.engine.hf_generator.collate` concatenates the tensors along dim 0 across a batch and rebuilds the per-token
`mm_token_type_ids` the 3D rope needs.
"""
from __future__ import annotations

import time
from typing import Any

from PIL import Image

from worker.engine.request import ModelInput
from worker.answers.prompts import Prompt

_PLACEHOLDER = "<|placeholder|>"  # an image's placeholders while the others are still being expanded
VISION_MODEL_TYPES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor"}


def is_vision_config(config: Any) -> bool:
    """True when `config` (a transformers config) is a Qwen2-VL or Qwen2.5-VL model."""
    return getattr(config, "model_type", None) in VISION_MODEL_TYPES


def load_processor(source: str, config: Any) -> Any:
    """The processor of the vision model at `source` (hub id or folder); images only without torchvision."""
    import transformers
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return transformers.AutoProcessor.from_pretrained(source)
    # transformers 5.x makes the video processor a required part of the Qwen VL processors, and it needs
    # torchvision, which has no CPU build on our machines. Documents never hold videos, so drop that part:
    # `ProcessorMixin` reads a processor's parts from its `__init__` signature.
    base = getattr(transformers, VISION_MODEL_TYPES[config.model_type])

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
            self.video_processor = None

    return ImageOnlyProcessor.from_pretrained(source)


def build_vision_prompt(processor: Any, around: tuple[str, str], parts: list[str | Image.Image],
                        max_input_tokens: int, *, tensors: bool = True) -> Prompt:
    """One user turn holding `parts` in order (text and page images) between the task prompt's text before
    and after the document (`around`). Without `tensors` (vLLM, whose processor makes them from the images) the
    images are not processed here: their placeholders are counted from their sizes, as the processor counts them.

    The result fits `max_input_tokens`: text is cut from the end of the text parts first (the last part
    first) and `is_truncated` is set; images are never cut. Raises ValueError when the images, the
    instruction and the template alone exceed the budget. `extras` is empty when there is no image.
    """
    tokenizer = processor.tokenizer
    images = [part for part in parts if isinstance(part, Image.Image)]
    texts = [part for part in parts if not isinstance(part, Image.Image)]
    # Cutting works on token ids so that every round strictly shrinks the text and the loop ends;
    # an untouched part keeps its original string (a decode round trip may alter whitespace).
    kept_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    kept_texts = list(texts)
    is_truncated = False
    while True:
        encoded = _encode(processor, around, parts, kept_texts, images, tensors)
        token_ids = encoded["input_ids"][0].tolist()
        excess = len(token_ids) - max_input_tokens
        if excess <= 0:
            break
        if not any(kept_ids):
            raise ValueError(f"{len(images)} page image(s) with the task prompt take {len(token_ids)} tokens, "
                             f"over the input budget of {max_input_tokens}; lower the processor's max_pixels")
        is_truncated = True
        for index in reversed(range(len(kept_ids))):
            if excess <= 0:
                break
            cut = min(excess, len(kept_ids[index]))
            if cut:
                kept_ids[index] = kept_ids[index][:len(kept_ids[index]) - cut]
                kept_texts[index] = tokenizer.decode(kept_ids[index])
                excess -= cut
    extras = {"pixel_values": encoded["pixel_values"], "image_grid_thw": encoded["image_grid_thw"]} \
        if images and tensors else {}
    return Prompt(ModelInput(token_ids, extras, images=tuple(images)), is_truncated=is_truncated)


WARM_UP_PAGE = (448, 616)  # a blank page's pixels (a letter page's proportions, whole 28-pixel patches)


def warm_up(engine: Any, processor: Any, max_input_tokens: int, timeout_s: float = 600) -> float:
    """Run one blank page through `engine` before any job comes, and return the seconds it took. vLLM compiles
    kernels at its first image request (Triton's rotary kernel of the 3D rope: seconds), which would otherwise
    land on the steps of a batch's first pages."""
    page = Image.new("RGB", WARM_UP_PAGE, "white")
    prompt = build_vision_prompt(processor, ("", "Read the page."), [page], max_input_tokens,
                                 tensors=not getattr(engine, "processes_images", False))
    started = time.perf_counter()
    engine.submit(prompt.model_input, 2).result(timeout=timeout_s)
    return time.perf_counter() - started


def _encode(processor: Any, around: tuple[str, str], parts: list[str | Image.Image], texts: list[str],
            images: list[Image.Image], tensors: bool) -> Any:
    """Chat-template the parts (with `texts` standing in for the text parts, in order) between the text
    `around` them, and run the processor (without `tensors`: expand each image's placeholder as it does, and
    tokenize). Qwen's template joins content parts with nothing between them."""
    before, after = around
    content: list[dict[str, str]] = [{"type": "text", "text": before}] if before else []
    remaining = iter(texts)
    for part in parts:
        if isinstance(part, Image.Image):
            content.append({"type": "image"})
        elif text := next(remaining):
            content.append({"type": "text", "text": text})
    if after:
        content.append({"type": "text", "text": after})
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                           tokenize=False)
    if tensors:
        return processor(text=[prompt], images=images or None, return_tensors="pt")
    merged = processor.image_processor.merge_size ** 2  # patches per placeholder
    for image in images:  # as Qwen2-VL's processor does, with the patch count its image processor gives
        count = processor.image_processor.get_number_of_image_patches(image.height, image.width) // merged
        prompt = prompt.replace(processor.image_token, _PLACEHOLDER * count, 1)
    return processor.tokenizer([prompt.replace(_PLACEHOLDER, processor.image_token)], return_tensors="pt")
