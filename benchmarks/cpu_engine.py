"""The paged engine on a CPU, started as an infer worker starts it, against a static-batch `generate`, one run.

    python benchmarks/cpu_engine.py --rows 11 --new-tokens 120 --dtypes float32,bfloat16
    python benchmarks/cpu_engine.py --rows 11 --new-tokens 120 --dtypes float32,float16    # an AVX2 CPU
    python benchmarks/cpu_engine.py --rows 25 --long-prompt-tokens 7800 --new-tokens 32 --dtypes bfloat16 \
        --group-ratios 2,inf --threads 1 --no-baseline    # decode rows grouped by length, or one padded group

The packaged small model (SmolLM2-135M-Instruct). `--rows` summarize prompts cut from the bundled contracts
(about 150 to 500 tokens), every answer `--new-tokens` long (EOS ignored). For each dtype:
1. docbatch: `worker.service.process.start_engine`, the infer worker's own start (model load, engine build, the
   engine's thread), then every prompt submitted at once; decode ms/step from the engine's statistics.
2. Baseline: the same prompts in one `generate` call (left padded) through `HFGenerator`, the model loaded
   again in the same dtype (float32 for float16 on a CPU: fp16 weights are the paged engine's), on a thread
   of its own as the engine's runs.
`--long-prompt-tokens N` adds one prompt of about N tokens (the contracts repeated), decoding beside the short
ones; `--group-ratios` runs docbatch once per ratio of its decode attention's grouping (`inf`: every decode row
padded to the step's longest, as before the grouping); `--threads` pins the engine's threads (0: the free cores).
Prints a JSON line per measurement; with --out, writes them to cpu_engine.json there.
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.settings import Settings  # noqa: E402
from schemas.tasks import builtin_task  # noqa: E402
from worker.engine.paged.attention import DECODE_GROUP_RATIO  # noqa: E402
from worker.engine.request import GenerationOptions, ModelInput  # noqa: E402
from worker.engine.hf_generator import HFGenerator  # noqa: E402
from worker.documents.extract import extract_pages  # noqa: E402
from worker.models.loading import load_model  # noqa: E402
from worker.service.process import on_a_passing_thread, start_engine  # noqa: E402
from worker.answers.prompts import build_text_prompt  # noqa: E402

OPTIONS = GenerationOptions(repetition_penalty=1.1, ignore_eos=True)


def prompts(settings: Settings, tokenizer, rows: int, long_prompt_tokens: int = 0) -> list[ModelInput]:
    render = builtin_task("summarize", settings).render
    folder = importlib.resources.files("producer") / "samples" / "contracts"
    texts = ["\n\n".join(p.text for p in extract_pages(path.read_bytes())) for path in sorted(folder.iterdir())]
    inputs = [build_text_prompt(tokenizer, render, texts[i % len(texts)][:300 + 90 * i], 4096).model_input
              for i in range(rows)]
    if long_prompt_tokens:
        text = "\n\n".join(texts * (1 + long_prompt_tokens // 500))
        inputs.append(build_text_prompt(tokenizer, render, text, long_prompt_tokens).model_input)
    return inputs


def docbatch(settings: Settings, rows: int, new_tokens: int, long_prompt_tokens: int = 0,
             group_ratio: float = DECODE_GROUP_RATIO) -> dict:
    rt = start_engine(settings, "bench")
    rt.engine.runner.attention.group_ratio = group_ratio
    inputs = prompts(settings, rt.tokenizer, rows, long_prompt_tokens)
    started = time.perf_counter()
    futures = [rt.engine.submit(p, new_tokens, OPTIONS) for p in inputs]
    tokens = sum(len(f.result().token_ids) for f in futures)
    seconds = time.perf_counter() - started
    stats = rt.engine.stats
    rt.engine.stop()
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "decode_ms_per_step": round(1000 * stats.decode_step_s / max(1, stats.num_decode_steps), 1),
            "prompt_tokens": sum(len(p.token_ids) for p in inputs), "group_ratio": group_ratio,
            "engine_threads": rt.engine.threads.num_threads}


def baseline(settings: Settings, rows: int, new_tokens: int) -> dict:
    loaded = on_a_passing_thread(lambda: load_model(settings))
    inputs = prompts(settings, loaded.tokenizer, rows)
    generator = HFGenerator(loaded.model, loaded.tokenizer, loaded.eos_token_ids)
    started = time.perf_counter()
    outputs = on_a_passing_thread(lambda: generator(inputs, [new_tokens] * rows, OPTIONS))
    seconds = time.perf_counter() - started
    tokens = sum(map(len, outputs))
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "computed_in": str(loaded.model.dtype).removeprefix("torch.")}  # float16 on a CPU: float32 here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=11)
    parser.add_argument("--new-tokens", type=int, default=120)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--home", type=Path, default=Path.home() / ".docbatch")
    parser.add_argument("--long-prompt-tokens", type=int, default=0)
    parser.add_argument("--group-ratios", default=str(DECODE_GROUP_RATIO))
    parser.add_argument("--threads", type=int, default=0, help="the engine's threads; 0: the free cores")
    parser.add_argument("--no-baseline", action="store_true", help="docbatch only, no `generate`")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import torch

    lines = []
    for dtype in args.dtypes.split(","):
        settings = Settings(home=args.home, device="cpu", engine="paged", dtype=dtype, cpu_threads=args.threads)
        runs = [("docbatch paged", lambda ratio=float(ratio): docbatch(settings, args.rows, args.new_tokens,
                                                                        args.long_prompt_tokens, ratio))
                for ratio in args.group_ratios.split(",")]
        if not args.no_baseline:
            runs.append(("generate, one static batch", lambda: baseline(settings, args.rows, args.new_tokens)))
        for name, run in runs:
            line = {"dtype": dtype, "run": name, "rows": args.rows, "new_tokens": args.new_tokens,
                    "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), **run()}
            print(json.dumps(line), flush=True)
            lines.append(line)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_engine.json").write_text(json.dumps(lines, indent=1))


if __name__ == "__main__":
    main()
