"""fp16 weights on a CPU (FBGEMM) on the real small model: they load through the product's loader and builder, take
half float32's bytes and answer as float32 does; the weight formats of a GPU (fp8, nf4, a quantised checkpoint)
are vLLM's, and the CPU engines refuse them at start."""
from __future__ import annotations

import pytest

from schemas.settings import Settings
from worker.engine.request import GenerationOptions, ModelInput
from worker.engine.builder import build_engine
from worker.engine.hf_generator import HFGenerator
from worker.engine.quant import fbgemm_available, quantize
from worker.models.loading import load_model

pytestmark = pytest.mark.slow
NEW_TOKENS = 12
GREEDY = GenerationOptions()  # greedy, no penalty: agreement measures the model, not the sampler
QUESTIONS = ["The capital of France is", "A contract is an agreement between", "List three colours:",
             "The Supplier shall deliver the goods", "Water boils at", "Write one word:",
             "The invoice is payable within", "Once upon a time"]


def _settings(small_model_dir, **overrides) -> Settings:
    return Settings(**{"model": str(small_model_dir), "device": "cpu", "home": small_model_dir.parent,
                       "engine": "paged", "max_batch_size": 8, "dtype": "float32", **overrides})


@pytest.fixture(scope="module")
def questions(small_model) -> list[ModelInput]:
    return [ModelInput(small_model.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(small_model, questions) -> list[list[int]]:
    """Float32 greedy answers from transformers' `generate` (the paged engine gives the same, tested elsewhere)."""
    generator = HFGenerator(small_model.model, small_model.tokenizer, small_model.eos_token_ids)
    return [generator([q], [NEW_TOKENS], GREEDY)[0] for q in questions]


@pytest.fixture(scope="module")
def full_bytes(small_model_dir, questions):
    """The float32 model's weight bytes on an engine, each measured once."""
    sizes: dict[str, int] = {}

    def measure(engine: str = "paged") -> int:
        if engine not in sizes:
            sizes[engine] = _answers(small_model_dir, questions[:1], engine=engine)[1].weight_bytes
        return sizes[engine]

    return measure


def _answers(small_model_dir, questions, **overrides) -> tuple[list[list[int]], object]:
    """Greedy answers of an engine built as a worker builds it, and its statistics."""
    settings = _settings(small_model_dir, **overrides)
    engine = build_engine(settings, load_model(settings))
    try:
        futures = [engine.submit(q, NEW_TOKENS, GREEDY) for q in questions]
        return [f.result(timeout=600).token_ids for f in futures], engine.stats
    finally:
        engine.stop()


def _agreement(answers: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of prompts whose first token is the reference's, share of reference tokens matched at the same
    position up to the answer's first difference)."""
    first = sum(a[:1] == r[:1] for a, r in zip(answers, reference)) / len(reference)
    prefix = 0
    for answer, ref in zip(answers, reference):
        prefix += next((i for i, (a, r) in enumerate(zip(answer, ref)) if a != r), min(len(answer), len(ref)))
    return first, prefix / sum(len(r) for r in reference)


def _projection_params(small_model) -> int:
    layer = small_model.model.config
    head_dim = layer.hidden_size // layer.num_attention_heads
    per_layer = layer.hidden_size * (layer.hidden_size + 2 * layer.num_key_value_heads * head_dim  # q, k, v
                                     + layer.hidden_size  # o
                                     + 3 * layer.intermediate_size)  # gate, up, down
    return per_layer * layer.num_hidden_layers


@pytest.mark.skipif(not fbgemm_available(), reason="fp16 weights on a CPU need FBGEMM (x86 with AVX2)")
@pytest.mark.parametrize("engine", ["paged", "hf"])
def test_float16_on_a_cpu_keeps_projections_and_head_in_half_precision_and_answers_as_float32(
        small_model_dir, small_model, questions, reference, full_bytes, engine):
    # When the checkpoint loads with dtype float16 on the CPU
    answers, stats = _answers(small_model_dir, questions, dtype="float16", engine=engine)
    # Then the projections and the head take 2 bytes a weight (a head tied to the embeddings is a copy beside them)
    head = small_model.model.lm_head.weight.numel()
    tied = small_model.model.config.tie_word_embeddings
    expected = full_bytes(engine) - 2 * _projection_params(small_model) + (2 * head if tied else -2 * head)
    assert stats.weight_bytes == expected
    # and the answers are float32's: fp16 weights round to 11 bits, the products run in float32
    first, prefix = _agreement(answers, reference)
    print(f"fp16 weights ({engine}): {stats.weight_bytes / 2**20:.1f} MiB against {full_bytes(engine) / 2**20:.1f}; "
          f"first tokens equal {first:.0%}, tokens before the first difference {prefix:.0%}")
    assert first == 1 and prefix >= 0.9


@pytest.mark.skipif(not fbgemm_available(), reason="fp16 weights on a CPU need FBGEMM (x86 with AVX2)")
def test_fp16_projections_compute_what_their_weights_say(small_model):
    # One layer's down projection in fp16 against float32, on the same activations (fp16 keeps 11 bits a weight)
    import torch

    linear = small_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(5, linear.in_features)
    expected = linear(x)
    error = (quantize(linear, "fp16")(x) - expected).norm() / expected.norm()
    assert error < 1e-3


def test_a_checkpoint_already_quantised_is_not_the_paged_engines():
    from transformers import Qwen2Config

    from worker.engine.paged.model import unsupported_reason

    config = Qwen2Config(quantization_config={"quant_method": "awq", "bits": 4})
    assert "already quantised (awq): vLLM reads its format" in unsupported_reason(config)


@pytest.mark.parametrize("engine, overrides", [("hf", {"weight_format": "fp8"}), ("paged", {"kv_cache_dtype": "fp8"})])
def test_vllms_formats_fail_at_start_on_the_cpu_engines(small_model_dir, small_model, engine, overrides):
    with pytest.raises(ValueError, match="are vLLM's"):
        build_engine(_settings(small_model_dir, engine=engine, **overrides), small_model)


def test_the_hf_engine_reports_its_weights(small_model_dir, small_model):
    # while the hf engine in bf16 starts, and reports its weights too
    engine = build_engine(_settings(small_model_dir, engine="hf"), small_model)
    engine.stop()
    parameters = sum(p.numel() * p.element_size() for p in small_model.model.parameters())
    assert 0 <= engine.stats.weight_bytes - parameters < 2**20  # buffers (rope frequencies) included
