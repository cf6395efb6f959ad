"""Weight formats and the fp8 KV cache on the real small model (CPU): each loads through the product's loader
and builder, its weights shrink by what the format stores, and its greedy answers stay close to the full-
precision ones. Agreement is measured, then asserted a prompt below what was seen (deterministic on a CPU):
a quantised 135 M model is not the same model, and one changed token changes the rest of a greedy answer.
Seen with torch 2.13 (first tokens equal / tokens before the first difference, 8 prompts x 12 tokens):
int8 75 % / 44 %, fp8 88 % / 46 %, nf4 75 % / 16 %, fp8 KV cache 88 % / 67 %.
"""
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
FLOAT32_BYTES = 4


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


@pytest.mark.parametrize("weight_format, bytes_per_weight, min_first, min_prefix", [
    ("int8", 1.0, 0.6, 0.3),
    ("fp8", 1.0, 0.6, 0.3),
    ("nf4", 0.5 + 1 / 64, 0.5, 0.1),  # 4 bits, one uint8 block scale per 64
])
def test_a_quantised_model_is_smaller_and_answers_mostly_as_the_full_one(
        small_model_dir, small_model, questions, reference, full_bytes, weight_format, bytes_per_weight, min_first,
        min_prefix):
    if weight_format == "nf4":
        pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes (pip install 'docbatch[quant]')")
    # When the checkpoint loads in the format
    answers, stats = _answers(small_model_dir, questions, weight_format=weight_format)
    # Then the projections take `bytes_per_weight` instead of float32's 4 (scales within 1 % of the whole)
    expected = full_bytes() - _projection_params(small_model) * (FLOAT32_BYTES - bytes_per_weight)
    assert expected <= stats.weight_bytes <= expected * 1.01
    # and the answers agree with the full-precision model's on most tokens
    first, prefix = _agreement(answers, reference)
    print(f"{weight_format}: weights {stats.weight_bytes / 2**20:.1f} MiB against {full_bytes() / 2**20:.1f}; "
          f"first tokens equal {first:.0%}, tokens before the first difference {prefix:.0%}")
    assert first >= min_first and prefix >= min_prefix


def test_an_fp8_kv_cache_holds_four_times_the_float32_tokens_and_answers_mostly_the_same(
        small_model_dir, questions, reference):
    answers, stats = _answers(small_model_dir, questions, kv_cache_dtype="fp8", kv_cache_gb=0.05)
    _, full = _answers(small_model_dir, questions[:1], kv_cache_gb=0.05)
    assert stats.kv_capacity_tokens >= 4 * full.kv_capacity_tokens
    first, prefix = _agreement(answers, reference)
    print(f"fp8 KV cache: {stats.kv_capacity_tokens} tokens against {full.kv_capacity_tokens}; first tokens equal "
          f"{first:.0%}, tokens before the first difference {prefix:.0%}")
    assert first >= 0.75 and prefix >= 0.5


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


@pytest.mark.parametrize("weight_format, tolerance", [("int8", 0.03), ("fp8", 0.08), ("nf4", 0.15), ("fp16", 1e-3)])
def test_quantised_projections_compute_what_their_weights_say(small_model, weight_format, tolerance):
    # One layer's down projection in the format against float32, on the same activations (relative error:
    # int8 keeps 8 bits a value, e4m3 4 of mantissa, nf4 16 levels a weight, fp16 11 bits a weight)
    import torch

    if weight_format == "nf4":
        pytest.importorskip("bitsandbytes", reason="nf4 needs bitsandbytes (pip install 'docbatch[quant]')")
    if weight_format == "fp16" and not fbgemm_available():
        pytest.skip("fp16 weights on a CPU need FBGEMM (x86 with AVX2)")
    linear = small_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(5, linear.in_features)
    expected = linear(x)
    error = (quantize(linear, weight_format)(x) - expected).norm() / expected.norm()
    assert error < tolerance


def test_a_checkpoint_already_quantised_is_left_to_the_hf_engine():
    from transformers import Qwen2Config

    from worker.engine.paged.model import unsupported_reason

    config = Qwen2Config(quantization_config={"quant_method": "awq", "bits": 4})
    assert "already quantised (awq)" in unsupported_reason(config)


def test_formats_fail_at_start_on_the_hf_engine_which_reports_its_bf16_weights(small_model_dir, small_model):
    settings = _settings(small_model_dir, engine="hf", weight_format="int8")
    with pytest.raises(ValueError, match="apply to the paged engine"):
        build_engine(settings, small_model)
    # while the hf engine in bf16 starts, and reports its weights too
    engine = build_engine(_settings(small_model_dir, engine="hf"), small_model)
    engine.stop()
    parameters = sum(p.numel() * p.element_size() for p in small_model.model.parameters())
    assert 0 <= engine.stats.weight_bytes - parameters < 2**20  # buffers (rope frequencies) included
