"""Per-token cost of schema-constrained decoding (llguidance masks) against free decoding, same run.

    python benchmarks/constrained_decoding.py --model smollm2-135m --rows 8 --new-tokens 256
    python benchmarks/constrained_decoding.py --model /tmp/q7b --rows 128 --new-tokens 256   # a GPU: vLLM

Builds `--rows` extract prompts from the bundled financial reports, then submits them all at once, in alternating
rounds, to the engine a worker would run for these settings (vLLM on a GPU, the paged engine on a CPU; `--engine`),
free and constrained to the FinancialReport schema. Reports output tokens/s of each, the decode steps the longest
answer took, and how many answers validate (a random-weight model's constrained answers are JSON of noise, cut off
at --new-tokens: the cost per token is what is measured).
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.outputs import FinancialReport  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from worker.engine.request import GenerationOptions, ModelInput  # noqa: E402
from worker.documents.extract import extract_pages  # noqa: E402
from worker.service.process import start_engine  # noqa: E402
from schemas.tasks import builtin_task  # noqa: E402
from worker.answers.prompts import build_text_prompt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--home", type=Path, default=Path.home() / ".docbatch")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the first pays warm-up costs")
    parser.add_argument("--engine", choices=["auto", "vllm", "paged", "hf"], default="auto")
    args = parser.parse_args()

    settings = Settings(home=args.home, model=args.model, engine=args.engine, max_batch_size=args.rows)
    rt = start_engine(settings, "bench@constrained")  # as an infer worker starts it
    engine, tokenizer = rt.engine, rt.tokenizer
    folder = importlib.resources.files("producer") / "samples" / "financials"
    texts = ["\n\n".join(p.text for p in extract_pages(f.read_bytes())) for f in sorted(folder.iterdir())]
    task = builtin_task("extract", settings)
    prompts = [build_text_prompt(tokenizer, task.render, texts[i % len(texts)], 4096).model_input
               for i in range(args.rows)]
    options = GenerationOptions(repetition_penalty=1.1)
    engine.submit(ModelInput(prompts[0].token_ids, json_schema=task.schema_text), 8, options).result()  # warm-up
    rows = []
    rounds = [("free", None), ("constrained", task.schema_text)] * args.repeats
    for round_no, (mode, schema) in enumerate(rounds):
        started = time.perf_counter()
        futures = [engine.submit(ModelInput(p.token_ids, json_schema=schema), args.new_tokens, options)
                   for p in prompts]
        outputs = [future.result().token_ids for future in futures]
        seconds = time.perf_counter() - started
        answers = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        valid = sum(_valid(a) for a in answers)
        tokens = sum(len(o) for o in outputs)
        # A batch runs until its longest row ends: count the steps it took, not only the tokens kept.
        steps = max(len(o) for o in outputs)
        rows.append({"mode": mode, "round": round_no // 2 + 1, "rows": len(prompts), "tokens_out": tokens, "decode_steps": steps,
                     "seconds": round(seconds, 2), "out_tok_s": round(tokens / seconds, 1),
                     "ms_per_step": round(1000 * seconds / steps, 1), "valid": f"{valid}/{len(prompts)}"})
        print(json.dumps(rows[-1]), flush=True)
    engine.stop()
    print(f"\nmodel {args.model}, engine {type(engine).__name__}")
    print("| decoding | round | rows | output tokens | decode steps | seconds | output tokens/s | ms per step | valid |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['round']} | {r['rows']} | {r['tokens_out']} | {r['decode_steps']} | {r['seconds']} "
              f"| {r['out_tok_s']} | {r['ms_per_step']} | {r['valid']} |")


def _valid(text: str) -> bool:
    try:
        FinancialReport.model_validate_json(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
