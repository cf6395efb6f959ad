"""Tensor parallelism on a CPU: a tiny random Qwen2 over a 2-process gloo group answers token for token as the
same checkpoint unsharded, each rank holding half the heads (so twice the tokens in the same KV bytes).

The group is real (torch.distributed, gloo, two processes); only the GPUs are missing: NCCL and two GPUs were
not available where these tests run."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from schemas.settings import Settings
from worker.engine.request import GenerationOptions, ModelInput
from worker.engine.builder import build_engine
from worker.engine.paged.attention import HeadShape
from worker.engine.builder import run_follower
from worker.engine.paged.tensor_parallel import TensorParallel, join_group
from worker.models.loading import load_model

VOCAB = 256
NEW_TOKENS = 12
PROMPTS = [[5, 17, 33, 2, 90], list(range(40, 80)), [7] * 3, [101, 55, 12, 9, 200, 201, 3, 8, 77]]
KV_CACHE_GB = 0.002


def _settings(model_dir: Path) -> Settings:
    return Settings(model=str(model_dir), device="cpu", home=model_dir.parent, engine="paged", max_batch_size=8,
                    kv_cache_gb=KV_CACHE_GB, dtype="float32")  # exact: shards' partial sums round alike


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 (4 query heads over 2 key/value heads, q/k/v biases) saved as a checkpoint folder."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t2")),
                                        eos_token=f"t{VOCAB - 1}", pad_token="t0")
    tokenizer.save_pretrained(folder)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, eos_token_id=VOCAB - 1,
                         pad_token_id=0, bos_token_id=1, initializer_range=0.2)  # peaky: no near-ties in greedy
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, model_dir: Path, out: Path) -> None:
    """One rank of the group, joined as the launcher's processes join (its environment variables): rank 0
    serves the prompts through its engine, the other follows its steps."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tp = join_group()
    try:
        settings = _settings(model_dir)
        if tp.is_leader:
            engine = build_engine(settings, load_model(settings, keep_on_cpu=True), tp)
            futures = [engine.submit(ModelInput(p), NEW_TOKENS, GenerationOptions()) for p in PROMPTS]
            result = {"answers": [f.result(timeout=300).token_ids for f in futures],
                      "kv_capacity_tokens": engine.stats.kv_capacity_tokens, "weight_bytes": engine.stats.weight_bytes}
            engine.stop()
        else:
            result = {"steps": run_follower(settings, load_model(settings, keep_on_cpu=True), tp)}
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_a_two_rank_group_answers_as_the_unsharded_model(tiny_qwen2, tmp_path):
    # Given the unsharded engine's greedy answers
    settings = _settings(tiny_qwen2)
    engine = build_engine(settings, load_model(settings))
    futures = [engine.submit(ModelInput(p), NEW_TOKENS, GenerationOptions()) for p in PROMPTS]
    reference = [f.result(timeout=300).token_ids for f in futures]
    whole = engine.stats
    engine.stop()
    # When the same checkpoint runs over two ranks
    mp.spawn(_rank_main, args=(2, _free_port(), tiny_qwen2, tmp_path), nprocs=2, join=True)
    leader = json.loads((tmp_path / "rank0.json").read_text())
    follower = json.loads((tmp_path / "rank1.json").read_text())
    # Then the answers are the same, token for token
    assert leader["answers"] == reference
    assert all(len(answer) == NEW_TOKENS for answer in reference)
    # and the follower ran the steps, each rank with half the heads: twice the tokens in the same KV bytes
    assert follower["steps"] >= NEW_TOKENS  # one step with every prompt, then one per further token
    assert leader["kv_capacity_tokens"] >= 2 * whole.kv_capacity_tokens - 16
    assert leader["weight_bytes"] < whole.weight_bytes


def test_heads_that_do_not_split_evenly_are_refused():
    with pytest.raises(ValueError, match="divisible by 3"):
        TensorParallel(rank=0, world_size=3).heads(HeadShape(num_heads=4, num_kv_heads=2, head_dim=16))
