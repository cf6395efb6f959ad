"""Each weight format (and the fp8 KV cache) of the paged engine on one model and one workload, on a GPU.

    python benchmarks/weight_formats.py --model /tmp/q7b --formats bf16,nf4,fp8,int8,bf16/fp8 --out /tmp/wf

Each format runs in a process of its own, built as a worker builds it (`load_model`, `build_engine`:
memory profiled, KV cache sized from what is free, CUDA graphs captured), and reports:
  - weight memory in its format, KV cache capacity (tokens, sequences of 4 K), the start-up peak;
  - the workload: `--prompts` random-token prompts of `--prompt-tokens`, `--new-tokens` each (greedy, EOS
    ignored), all submitted at once: output tokens/s over the whole run, the mean decode step;
  - agreement with the first format (bf16): share of answers whose first token is the same, share of all
    answer tokens equal at the same position, and the relative error of the last prompt token's logits
    (||l - l_bf16|| / ||l_bf16||) over `--check-prompts` prompts;
  - with `--text FILE`: the perplexity of the model on the file's first `--text-tokens` tokens (one forward
    pass, every token predicted from the ones before it): meaningful for trained weights only.
`--warm-kernels` builds a two-layer model of Qwen2.5-7B's head layout in bf16 and fp8 KV cache, so that
FlashInfer's JIT compilation can run beside `make_random_model.py`. Writes summary.json under --out.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from schemas.settings import Settings  # noqa: E402
from worker.engine.request import GenerationOptions, ModelInput  # noqa: E402
from worker.engine.builder import build_engine  # noqa: E402
from worker.engine.paged.scheduler import ScheduledStep  # noqa: E402
from worker.engine.paged.sequence import Sequence  # noqa: E402
from worker.engine.paged.step_inputs import StepInputs  # noqa: E402
from worker.models.loading import LoadedModel, load_model, prepare_tokenizer  # noqa: E402

GREEDY_TO_THE_END = GenerationOptions(ignore_eos=True)


def prompts(count: int, tokens: int) -> list[list[int]]:
    """Deterministic random-token prompts (ids inside any Qwen-sized vocabulary)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, 30000, (count, tokens), generator=generator).tolist()


def last_token_logits(engine, token_ids: list[list[int]]) -> torch.Tensor:
    """float32 logits [P, vocab] of each prompt's last token, computed through the engine's runner alone."""
    blocks, runner = engine.scheduler.blocks, engine.runner
    rows = []
    for ids in token_ids:
        seq = Sequence(ids, 1)
        blocks.allocate(seq, len(ids))
        rows.append(runner._forward(StepInputs.build(ScheduledStep([seq], [len(ids)]), blocks.block_size,
                                                      runner.device)).float().cpu())
        blocks.free(seq)
    return torch.cat(rows)


@torch.inference_mode()
def perplexity(engine, token_ids: list[int]) -> float:
    """exp of the mean negative log-likelihood of each token given those before it, through the engine's model."""
    blocks, runner = engine.scheduler.blocks, engine.runner
    seq = Sequence(token_ids, 1)
    blocks.allocate(seq, len(token_ids))
    inputs = StepInputs.build(ScheduledStep([seq], [len(token_ids)]), blocks.block_size, runner.device)
    hidden = runner.model(inputs.input_ids, inputs.positions, runner.attention.plan(inputs))
    nll = torch.nn.functional.cross_entropy(runner.model.compute_logits(hidden[:-1]), inputs.input_ids[1:])
    blocks.free(seq)
    return math.exp(nll.item())


def text_tokens(model: str, path: str, count: int) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)(Path(path).read_text(), add_special_tokens=False)["input_ids"][:count]


def run_one(args, weight_format: str, kv_cache_dtype: str) -> dict:
    settings = Settings(model=args.model, engine="paged", weight_format=weight_format, kv_cache_dtype=kv_cache_dtype,
                        max_batch_size=args.batch)
    started = time.perf_counter()
    engine = build_engine(settings, load_model(settings))
    built_s = time.perf_counter() - started
    work = prompts(args.prompts, args.prompt_tokens)
    for future in [engine.submit(ModelInput(p[:32]), 4, GREEDY_TO_THE_END) for p in work[:8]]:
        future.result()  # warm-up: allocator, kernels of every path
    stats = engine.stats
    steps_before, decode_before = stats.num_decode_steps, stats.decode_step_s
    started = time.perf_counter()
    futures = [engine.submit(ModelInput(p), args.new_tokens, GREEDY_TO_THE_END) for p in work]
    answers = [f.result().token_ids for f in futures]
    seconds = time.perf_counter() - started
    engine.stop()
    logits = last_token_logits(engine, work[:args.check_prompts])
    text_perplexity = perplexity(engine, text_tokens(args.model, args.text, args.text_tokens)) if args.text else None
    name = weight_format if kv_cache_dtype == "auto" else f"{weight_format}/{kv_cache_dtype}"
    torch.save({"answers": answers, "logits": logits}, Path(args.scratch) / f"{name.replace('/', '-')}.pt")
    decode_steps = stats.num_decode_steps - steps_before
    return {"format": name, "weight_gib": round(stats.weight_bytes / 2**30, 2),
            "kv_cache_gib": round(stats.kv_cache_bytes / 2**30, 1), "kv_tokens": stats.kv_capacity_tokens,
            "kv_seqs_4k": stats.kv_capacity_sequences, "peak_gib": round((stats.device_peak_bytes or 0) / 2**30, 1),
            "build_s": round(built_s, 1), "run_s": round(seconds, 1),
            "output_tok_s": round(sum(map(len, answers)) / seconds),
            "decode_step_ms": round(1000 * (stats.decode_step_s - decode_before) / max(decode_steps, 1), 1),
            "decode_steps": decode_steps} | ({"perplexity": round(text_perplexity, 3)} if args.text else {})


def agreement(scratch: Path, name: str, reference: str) -> dict:
    mine, ref = (torch.load(scratch / f"{n.replace('/', '-')}.pt") for n in (name, reference))
    pairs = list(zip(mine["answers"], ref["answers"]))
    equal = sum(a == b for x, y in pairs for a, b in zip(x, y))
    error = (mine["logits"] - ref["logits"]).norm() / ref["logits"].norm()
    return {"first_token_equal": round(sum(x[:1] == y[:1] for x, y in pairs) / len(pairs), 3),
            "tokens_equal": round(equal / sum(len(y) for _, y in pairs), 3), "logits_rel_err": round(float(error), 4),
            "top1_equal": float((mine["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean())}


def warm_kernels(tokenizer_dir: str) -> None:
    """FlashInfer's kernels for Qwen2.5-7B's heads (28 over 4, 128 wide), bf16 and fp8 KV, decode and prefill."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=3584, intermediate_size=512, num_hidden_layers=2, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=32768, max_position_embeddings=4096, eos_token_id=2)
    for kv_cache_dtype in ("auto", "fp8"):
        model = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval()
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir))
        settings = Settings(engine="paged", kv_cache_gb=1, max_batch_size=16, kv_cache_dtype=kv_cache_dtype)
        engine = build_engine(settings, LoadedModel(model, tokenizer, "cuda"))
        futures = [engine.submit(ModelInput(list(range(100, 140 + i))), 8, GREEDY_TO_THE_END) for i in range(4)]
        print(json.dumps({"warmed": kv_cache_dtype, "tokens": [len(f.result().token_ids) for f in futures]}), flush=True)
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--formats", default="bf16,nf4,fp8,int8,bf16/fp8", help="weight format[/kv cache dtype]")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--check-prompts", type=int, default=16)
    parser.add_argument("--text", help="a text file to measure perplexity on (trained weights only)")
    parser.add_argument("--text-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--scratch", default="/tmp/weight_formats")
    parser.add_argument("--one", help="(internal) run this format in this process and print its JSON")
    parser.add_argument("--warm-kernels", metavar="TOKENIZER_DIR")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.warm_kernels:
        return warm_kernels(args.warm_kernels)
    if args.one:
        weight_format, _, kv_cache_dtype = args.one.partition("/")
        print("RESULT " + json.dumps(run_one(args, weight_format, kv_cache_dtype or "auto")), flush=True)
        return
    Path(args.scratch).mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.formats.split(","):
        command = [sys.executable, __file__, "--one", name] + [a for a in sys.argv[1:] if a != "--one"]
        done = subprocess.run(command, capture_output=True, text=True)
        sys.stderr.write(done.stderr[-3000:])
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        row = json.loads(lines[-1][7:]) if lines else {"format": name, "error": done.stderr[-400:]}
        if lines and results and "error" not in results[0]:
            row.update(agreement(Path(args.scratch), name, results[0]["format"]))
        print(json.dumps(row), flush=True)
        results.append(row)
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
        (args.out / "summary.json").write_text(json.dumps({"model": args.model, "gpu": gpu,
                                                           "args": vars(args) | {"out": str(args.out)},
                                                           "results": results}, indent=1))


if __name__ == "__main__":
    main()
