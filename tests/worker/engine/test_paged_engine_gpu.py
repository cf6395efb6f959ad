"""GPU paths of the paged engine: FlashInfer attention and CUDA-graph decode steps agree with the plain
PyTorch path on the same paged cache, and the engine built on a GPU answers. Skipped without a GPU or
without FlashInfer (this project's CI machine has neither; the device machine runs them)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
flashinfer = pytest.importorskip("flashinfer", reason="needs flashinfer-python (pip install docbatch[gpu])")

from tokenizers import Tokenizer, models  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from schemas.settings import Settings  # noqa: E402
from worker.engine.request import GenerationOptions, ModelInput  # noqa: E402
from worker.engine.builder import build_engine  # noqa: E402
from worker.engine.paged.attention import WORKSPACE_BYTES, FlashInferAttention, TorchAttention  # noqa: E402
from worker.engine.paged.block_manager import BlockManager  # noqa: E402
from worker.engine.paged.cuda_graphs import DecodeGraphs  # noqa: E402
from worker.engine.paged.kv_cache import CacheShape, KVCache  # noqa: E402
from worker.engine.paged.model import DecoderModel  # noqa: E402
from worker.engine.paged.scheduler import Scheduler  # noqa: E402
from worker.engine.paged.sequence import Sequence  # noqa: E402
from worker.engine.paged.step_inputs import StepInputs  # noqa: E402
from worker.models.loading import LoadedModel  # noqa: E402

VOCAB = 512


def _tiny_qwen2() -> Qwen2ForCausalLM:
    """Qwen2.5-7B's head layout (28 query heads over 4 key/value heads of 128), two layers, random weights."""
    config = Qwen2Config(hidden_size=28 * 128, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=4096,
                         eos_token_id=VOCAB - 1, pad_token_id=0, bos_token_id=1, initializer_range=0.2)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval()


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
                                   eos_token=f"t{VOCAB - 1}", pad_token="t0")


def _mixed_step(model: DecoderModel, block_size: int = 16):
    """A step of two prompt chunks (one with cached tokens before it) and three decodes, with every
    earlier token's keys and values already in a cache filled through the torch path."""
    torch.manual_seed(1)
    lengths, new = [300, 517, 40, 1000, 77], [300, 117, 1, 1, 1]
    blocks = BlockManager(4096, block_size)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_step_tokens=10**6, max_model_len=4096)
    seqs = [Sequence(torch.randint(2, VOCAB - 1, (n,)).tolist(), 4) for n in lengths]
    shape = CacheShape(len(model.layers), model.heads.num_kv_heads, model.heads.head_dim, block_size, model.dtype)
    cache = KVCache(shape, 4096, "cuda")
    for seq, count in zip(seqs, new):
        done = seq.num_tokens - count
        blocks.allocate(seq, seq.num_tokens)
        if done:  # fill the earlier tokens' cache
            prefill = StepInputs.build(_one(seq, done), block_size, model.device)
            model(prefill.input_ids, prefill.positions, TorchAttention(cache, model.heads).plan(prefill))
            seq.num_computed_tokens = done
    step = _one(seqs[0], new[0])
    for seq, count in zip(seqs[1:], new[1:]):
        step.seqs.append(seq)
        step.num_new_tokens.append(count)
    return cache, StepInputs.build(step, block_size, model.device), scheduler


def _one(seq, count):
    from worker.engine.paged.scheduler import ScheduledStep

    return ScheduledStep([seq], [count])


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.inference_mode()
def test_flashinfer_attention_matches_the_torch_path_on_a_mixed_step():
    model = DecoderModel(_tiny_qwen2())
    cache, inputs, _ = _mixed_step(model)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    saved = cache.data.clone()
    reference = model(inputs.input_ids, inputs.positions, TorchAttention(cache, model.heads).plan(inputs))
    cache.data.copy_(saved)
    flashinfer_attention = FlashInferAttention(cache, model.heads, workspace, model.dtype)
    fast = model(inputs.input_ids, inputs.positions, flashinfer_attention.plan(inputs))
    assert torch.isfinite(fast).all()
    assert _relative_error(fast, reference) < 2e-2


@torch.inference_mode()
def test_a_graph_replayed_decode_step_matches_the_eager_one():
    model = DecoderModel(_tiny_qwen2())
    cache, _, _ = _mixed_step(model)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")
    attention = FlashInferAttention(cache, model.heads, workspace, model.dtype)
    graphs = DecodeGraphs(model, attention, workspace, max_batch_size=40)
    # Three sequences that each decode one token, with their prompts in the cache
    torch.manual_seed(2)
    blocks = BlockManager(4096, 16)
    blocks.allocate(Sequence([1] * 16 * 200, 1), 16 * 200)  # keep clear of _mixed_step's blocks
    seqs = [Sequence(torch.randint(2, VOCAB - 1, (n,)).tolist(), 4) for n in (33, 700, 5)]
    for seq in seqs:
        blocks.allocate(seq, seq.num_tokens)
        prefill = StepInputs.build(_one(seq, seq.num_tokens - 1), 16, model.device)
        model(prefill.input_ids, prefill.positions, attention.plan(prefill))
        seq.num_computed_tokens = seq.num_tokens - 1
    from worker.engine.paged.scheduler import ScheduledStep

    inputs = StepInputs.build(ScheduledStep(seqs, [1, 1, 1]), 16, model.device)
    assert inputs.is_decode_only
    saved = cache.data.clone()
    eager = model.compute_logits(model(inputs.input_ids, inputs.positions, attention.plan(inputs)))
    cache.data.copy_(saved)
    replayed = graphs.replay(inputs).clone()
    assert replayed.shape == eager.shape
    assert _relative_error(replayed, eager) < 2e-2


def test_the_engine_built_on_a_gpu_sizes_its_cache_captures_graphs_and_answers(tmp_path):
    hf_model = _tiny_qwen2()
    loaded = LoadedModel(hf_model, _tokenizer(), "cuda")
    settings = Settings(home=tmp_path, engine="paged", max_batch_size=16, max_step_tokens=512,
                        gpu_memory_utilization=0.5)
    engine = build_engine(settings, loaded)
    try:
        assert engine.runner.graphs is not None and engine.runner.attention.name == "flashinfer"
        assert engine.stats.kv_blocks_total > 1000
        torch.manual_seed(3)
        prompts = [ModelInput(torch.randint(2, VOCAB - 1, (n,)).tolist()) for n in (5, 900, 64, 1500, 17)]
        options = [GenerationOptions(), GenerationOptions(repetition_penalty=1.2),
                   GenerationOptions(temperature=0.7, top_p=0.9)]
        futures = [engine.submit(p, 40, options[i % 3]) for i, p in enumerate(prompts)]
        completions = [f.result(timeout=300) for f in futures]
    finally:
        engine.stop()
    assert all(0 < len(c.token_ids) <= 40 for c in completions)
    assert all(0 <= t < VOCAB for c in completions for t in c.token_ids)
    assert engine.stats.kv_blocks_used == 0
