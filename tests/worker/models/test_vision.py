"""The vision-language path: page images reach a Qwen2.5-VL model through its processor, batched by the engine.

The model is a real `Qwen2_5_VLForConditionalGeneration`, tiny and with random weights, saved to disk with
its processor files and loaded back through the product's `load_model`. Its tokenizer is the packaged
SmolLM2 one plus Qwen's vision tokens and a Qwen2-VL style chat template.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from schemas.settings import Settings
from tiny_models import CONTEXT_TOKENS
from worker.engine.request import Completion, GenerationOptions
from worker.engine.hf_generator import HFGenerator, collate, vision_token_types
from worker.engine.static_engine import StaticEngine
from worker.models.loading import load_model
from worker.models.vision import WARM_UP_PAGE, build_vision_prompt, is_vision_config, warm_up

INSTRUCTION = "Summarize this document."
AROUND = ("", "\n\n" + INSTRUCTION)  # the task prompt around the document: nothing before, this after


@pytest.fixture(scope="session")
def vl_model(vl_model_dir: Path, tmp_path_factory):
    """In float32, where a padded row's logits can be compared with its own encoding's to 1e-5."""
    return load_model(Settings(model=str(vl_model_dir), device="cpu", home=tmp_path_factory.mktemp("home"),
                               dtype="float32"))


def page_image(title: str = "INVOICE 42") -> Image.Image:
    """A scanned-page stand-in: a white portrait page with a heading, lines of text and a table box."""
    page = Image.new("RGB", (280, 364), "white")
    draw = ImageDraw.Draw(page)
    draw.text((20, 20), title, fill="black")
    for row in range(8):
        draw.text((20, 60 + 20 * row), f"line {row}: 1,234.00 EUR", fill="black")
    draw.rectangle((15, 250, 265, 340), outline="black", width=2)
    return page


def image_pad_id(loaded) -> int:
    return loaded.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_a_vl_folder_loads_as_a_vision_model_with_its_processor(vl_model, small_model):
    # Given the tiny Qwen2.5-VL folder and the packaged text model, both loaded by the product's loader
    # Then the VL one carries a processor whose tokenizer is the model's, padding left, and its context
    # comes from the text config; the text model has no processor
    assert vl_model.is_vision and is_vision_config(vl_model.model.config)
    assert vl_model.tokenizer is vl_model.processor.tokenizer and vl_model.tokenizer.padding_side == "left"
    assert vl_model.context_tokens == CONTEXT_TOKENS
    assert not small_model.is_vision and small_model.processor is None


def test_an_image_becomes_one_placeholder_per_merged_patch_before_the_text_and_instruction(vl_model):
    # Given a page image followed by its text layer
    processor = vl_model.processor
    # When the prompt is built
    prompt = build_vision_prompt(processor, AROUND, [page_image(), "Invoice 42 from ACME"], 1000)
    # Then the image pad token appears as often as the processor's grid says, and the tensors ride along
    grid = prompt.model_input.extras["image_grid_thw"]
    patches = int(grid.prod())
    assert grid.shape == (1, 3) and not prompt.is_truncated
    merge = processor.image_processor.merge_size
    assert prompt.model_input.token_ids.count(image_pad_id(vl_model)) == patches // merge ** 2
    assert prompt.model_input.extras["pixel_values"].shape[0] == patches
    text = processor.tokenizer.decode(prompt.model_input.token_ids)
    assert text.index("<|vision_start|>") < text.index("Invoice 42 from ACME") < text.index(INSTRUCTION)


def test_for_vllm_the_placeholders_are_counted_without_processing_the_images(vl_model):
    # Given pages of different sizes and shapes between text parts (the tiny processor's pixel limits scale some)
    pages = [page_image(), page_image().resize((90, 300)), page_image().resize((56, 56))]
    parts = ["Cover note", pages[0], "Invoice 42", pages[1], pages[2]]
    # When the prompt is built for vLLM, whose own processor makes the image tensors
    for_vllm = build_vision_prompt(vl_model.processor, AROUND, parts, 1000, tensors=False).model_input
    # Then its token ids are the processor's own, placeholders included, with no tensors computed
    processed = build_vision_prompt(vl_model.processor, AROUND, parts, 1000).model_input
    assert for_vllm.token_ids == processed.token_ids
    assert for_vllm.extras == {} and len(for_vllm.images) == 3
    assert len({count for count in (int(grid.prod()) for grid in processed.extras["image_grid_thw"])}) > 1


class ImageReadingEngine:
    """An engine that, like vLLM, makes the image tensors itself; it records what it is asked and answers at once."""

    processes_images = True

    def __init__(self) -> None:
        self.asked: list[tuple] = []

    def submit(self, model_input, max_new_tokens, options=GenerationOptions()) -> Future:
        self.asked.append((model_input, max_new_tokens))
        future: Future = Future()
        future.set_result(Completion([1] * max_new_tokens, 1))
        return future


def test_a_vllm_vision_engine_reads_one_blank_page_before_any_job(vl_model):
    # Given a vision engine that makes its own image tensors (vLLM, which compiles its image path at first use)
    engine = ImageReadingEngine()
    # When the worker warms it up
    seconds = warm_up(engine, vl_model.processor, 1000)
    # Then it got one request: a blank page with its placeholders counted as the processor counts them, no tensors,
    # and a decode step after the prompt
    [(model_input, max_new)] = engine.asked
    [page] = model_input.images
    assert page.size == WARM_UP_PAGE and page.getextrema() == ((255, 255),) * 3
    processed = build_vision_prompt(vl_model.processor, ("", "Read the page."), [page], 1000).model_input
    assert model_input.token_ids == processed.token_ids and model_input.extras == {}
    assert max_new == 2 and seconds >= 0


def test_a_task_prompt_with_text_before_the_document_keeps_its_order(vl_model):
    # Given a custom task whose template puts text before and after the document
    around = ("File: scan.png\n\n", "\n\nAnswer as JSON.")
    # When the prompt is built for a page image and its text layer
    prompt = build_vision_prompt(vl_model.processor, around, [page_image(), "Invoice 42"], 1000)
    # Then the template's text, the image, the page text and the closing text come in that order
    text = vl_model.processor.tokenizer.decode(prompt.model_input.token_ids)
    assert (text.index("File: scan.png") < text.index("<|vision_start|>") < text.index("Invoice 42")
            < text.index("Answer as JSON."))


def test_a_text_only_prompt_has_no_extras(vl_model):
    prompt = build_vision_prompt(vl_model.processor, AROUND, ["only text"], 1000)
    assert prompt.model_input.extras == {}
    assert image_pad_id(vl_model) not in prompt.model_input.token_ids


def test_image_and_text_requests_share_a_batch_and_the_vision_encoder_sees_the_page(vl_model):
    # Given an image request and a text-only request, and a hook counting what the vision encoder receives
    processor = vl_model.processor
    image_prompt = build_vision_prompt(processor, AROUND, [page_image(), "Invoice 42"], 512).model_input
    text_prompt = build_vision_prompt(processor, AROUND, ["only text"], 512).model_input
    patches_seen: list[int] = []

    def record(module, args, kwargs, output):
        patches_seen.append((args[0] if args else kwargs["hidden_states"]).shape[0])

    hook = vl_model.model.model.visual.register_forward_hook(record, with_kwargs=True)
    engine = StaticEngine(HFGenerator(vl_model.model, vl_model.tokenizer, vl_model.eos_token_ids), max_batch_size=2, max_batch_tokens=4096,
                    max_wait_ms=5000).start()
    options, max_new = GenerationOptions(ignore_eos=True), 6
    futures: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def submit(name, model_input):
        barrier.wait()
        futures[name] = engine.submit(model_input, max_new, options)

    # When both are submitted at once from two threads
    threads = [threading.Thread(target=submit, args=item) for item in (("image", image_prompt), ("text", text_prompt))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        completions = {name: future.result(timeout=120) for name, future in futures.items()}
    finally:
        engine.stop()
        hook.remove()
    # Then they ran as one batch of two, each got its full answer, and the encoder ran once on the page's patches
    assert engine.stats.num_steps == 1 and engine.stats.last_step_seqs == 2
    assert [c.batch_size for c in completions.values()] == [2, 2]
    assert [len(c.token_ids) for c in completions.values()] == [max_new, max_new]
    assert patches_seen == [int(image_prompt.extras["image_grid_thw"].prod())]
    # And the image answer is the one the model gives that request alone, through the processor's own encoding
    input_ids = torch.tensor([image_prompt.token_ids])
    alone = vl_model.model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=torch.tensor(processor.create_mm_token_type_ids([image_prompt.token_ids])),
        **image_prompt.extras, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
        pad_token_id=vl_model.tokenizer.pad_token_id, eos_token_id=None)
    assert completions["image"].token_ids == alone[0, len(image_prompt.token_ids):].tolist()


def test_a_left_padded_image_row_gets_the_logits_of_the_processors_own_encoding(vl_model):
    # Given the processor's own single-request encoding of an image prompt (it adds the 3D-rope token types)
    processor, model = vl_model.processor, vl_model.model
    content = [{"type": "image"}, {"type": "text", "text": "Invoice 42"},
               {"type": "text", "text": "\n\n" + INSTRUCTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    encoding = processor(text=[text], images=[page_image()], return_tensors="pt")
    image_prompt = build_vision_prompt(processor, AROUND, [page_image(), "Invoice 42"], 512).model_input
    longer_text = build_vision_prompt(processor, AROUND, ["a much longer text-only request " * 12],
                                      512).model_input
    assert image_prompt.token_ids == encoding["input_ids"][0].tolist()
    # When the image row is collated behind a longer text row, so that it is left-padded
    batch = collate([image_prompt, longer_text], vl_model.tokenizer.pad_token_id, vision_token_types(model.config))
    assert batch["attention_mask"][0, 0] == 0
    with torch.inference_mode():
        alone = model(**encoding).logits[0, -1]
        batched = model(**batch).logits[0, -1]
        untyped = model(**{k: v for k, v in batch.items() if k != "mm_token_type_ids"}).logits[0, -1]
    # Then its next-token logits are the same; without mm_token_type_ids they are not (the check has teeth)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(untyped, alone, atol=1e-5, rtol=1e-5)


def test_a_long_text_is_cut_from_the_end_and_the_image_kept(vl_model):
    # Given a short text, a page image, then a long text layer, under a budget too small for all of it
    processor = vl_model.processor
    long_text = " ".join(f"clause {i} the tenant pays rent monthly." for i in range(200))
    parts = ["Cover letter.", page_image(), long_text]
    full = build_vision_prompt(processor, AROUND, parts, 100_000)
    budget = len(full.model_input.token_ids) // 10
    # When the prompt is built under that budget
    cut = build_vision_prompt(processor, AROUND, parts, budget)
    # Then it fits, says it was cut, keeps the whole image and the first text, and loses the long text's end
    assert cut.is_truncated and not full.is_truncated
    assert len(cut.model_input.token_ids) <= budget
    pad = image_pad_id(vl_model)
    assert cut.model_input.token_ids.count(pad) == full.model_input.token_ids.count(pad)
    assert torch.equal(cut.model_input.extras["pixel_values"], full.model_input.extras["pixel_values"])
    text = processor.tokenizer.decode(cut.model_input.token_ids)
    assert "Cover letter." in text and "clause 0 " in text and "clause 199" not in text
    assert text.rstrip().endswith(INSTRUCTION + "<|im_end|>\n<|im_start|>assistant")


def test_images_alone_over_the_budget_are_refused(vl_model):
    # Given a budget smaller than the image placeholders themselves
    processor = vl_model.processor
    image_only = build_vision_prompt(processor, AROUND, [page_image()], 100_000)
    # When / Then building the prompt with some text fails with a clear message instead of cutting the image
    with pytest.raises(ValueError, match="over the input budget"):
        build_vision_prompt(processor, AROUND, [page_image(), "some text"],
                            len(image_only.model_input.token_ids) - 1)
