"""Throughput of a real docbatch worker against one-request-at-a-time `generate`, in one run.

    python benchmarks/worker_throughput.py --docs 256 --prompt-tokens 1024 --new-tokens 256 \
        --model /tmp/qwen7b-random --max-batch-size 128 --out results/

1. Writes `--docs` synthetic contracts of about `--prompt-tokens` tokens each.
2. Baseline: loads the model through docbatch's own loader and runs `generate` one request at a time
   over the first `--baseline-docs` documents (same prompts, same answer length).
3. docbatch: `python -m producer.cli run` over all documents (embedded Redis, SQLite, a local worker),
   every answer exactly `--new-tokens` long (DOCBATCH_IGNORE_EOS), then reads the exported records.

With `--openai`, the same documents go in as an OpenAI Batch file instead (`run --openai-batch`): a third
of the requests ask for a `ContractSummary` JSON schema, a third for a small schema of their own, a third
for free text, all with `max_tokens` = `--new-tokens`. Answers end where the model ends them (schemas
constrain decoding, so EOS is not ignored), in the baseline too, which runs the same requests with the
same constraints one at a time.
Prints one JSON line per measurement and a summary table. Random-weight models say nothing about
answer quality, only about speed.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.outputs import ContractSummary  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from worker.engine import GenerationOptions, ModelInput  # noqa: E402
from worker.generation import HFGenerator  # noqa: E402
from worker.model import load_model  # noqa: E402
from schemas.tasks import builtin_task, schema_text  # noqa: E402
from worker.prompts import build_text_prompt, chat_tokens  # noqa: E402

CLAUSE = ("Clause {k}. The Supplier shall deliver the goods listed in Schedule {k} to the Customer's site within "
          "{d} business days of each purchase order, and the Customer shall pay each undisputed invoice within "
          "thirty days of receipt, failing which interest accrues at one percent per month. ")


def write_documents(folder: Path, count: int, tokenizer, prompt_tokens: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        text, k = f"Supply agreement no. {i} between Party {i} Ltd and Party {i + 1} plc.\n", 0
        while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < prompt_tokens - 60:
            text += CLAUSE.format(k=k, d=5 + (i + k) % 20)
            k += 1
        (folder / f"contract_{i:04d}.txt").write_text(text)


KEY_TERMS = {"type": "object", "additionalProperties": False, "required": ["parties", "term_days", "governing_law"],
             "properties": {"parties": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 60}},
                            "term_days": {"type": ["integer", "null"]},
                            "governing_law": {"type": ["string", "null"], "maxLength": 60}}}


def write_requests(folder: Path, path: Path, new_tokens: int) -> None:
    """The documents as OpenAI Batch lines: two JSON schemas and free text, in turn."""
    formats = [{"type": "json_schema", "json_schema": {"name": "contract", "schema": ContractSummary.model_json_schema()}},
               {"type": "json_schema", "json_schema": {"name": "key_terms", "schema": KEY_TERMS}}, None]
    lines = []
    for i, doc in enumerate(sorted(folder.glob("*.txt"))):
        body = {"model": "gpt-4o-mini", "max_tokens": new_tokens, "temperature": 0, "messages": [
            {"role": "user", "content": doc.read_text() + "\n\nSummarize this contract."}]}
        if formats[i % 3]:
            body["response_format"] = formats[i % 3]
        lines.append(json.dumps({"custom_id": doc.stem, "method": "POST", "url": "/v1/chat/completions", "body": body}))
    path.write_text("\n".join(lines) + "\n")


def document_prompts(tokenizer, settings: Settings, folder: Path, count: int) -> list[ModelInput]:
    render = builtin_task("summarize", settings).render
    return [build_text_prompt(tokenizer, render, p.read_text(), 100_000).model_input
            for p in sorted(folder.glob("*.txt"))[:count]]


def request_prompts(tokenizer, requests: Path, count: int) -> list[ModelInput]:
    prompts = []
    for line in requests.read_text().splitlines()[:count]:
        body = json.loads(line)["body"]
        schema = body.get("response_format", {}).get("json_schema", {}).get("schema")
        prompts.append(ModelInput(chat_tokens(tokenizer, body["messages"]),
                                  json_schema=schema_text(schema) if schema else None))
    return prompts


def baseline(settings: Settings, make_prompts, new_tokens: int) -> dict:
    """One request at a time through the same generator the engine uses."""
    import torch

    loaded = load_model(settings)
    generator = HFGenerator(loaded.model, loaded.tokenizer)
    options = GenerationOptions(repetition_penalty=settings.repetition_penalty, ignore_eos=settings.ignore_eos)
    prompts = make_prompts(loaded.tokenizer)
    generator([ModelInput(prompts[0].token_ids[:32])], [4], options)  # warm-up: CUDA context, kernels
    sync = torch.cuda.synchronize if loaded.device == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    tokens_out = sum(len(generator([p], [new_tokens], options)[0]) for p in prompts)
    sync()
    seconds = time.perf_counter() - started
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if loaded.device == "cuda" else None
    del generator, loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    count = len(prompts)
    return {"mode": "one_at_a_time_generate", "docs": count, "tokens_in_mean": sum(len(p.token_ids) for p in prompts) / count,
            "tokens_out": tokens_out, "seconds": round(seconds, 2), "out_tok_s": round(tokens_out / seconds, 1),
            "peak_gb": peak_gb and round(peak_gb, 1)}


def docbatch_run(settings: Settings, inputs: list[str], out_dir: Path, gpus: str) -> dict:
    env = {**os.environ, **settings.to_env()}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "producer.cli", "run", *inputs,
                           "--gpus", gpus, "--out-dir", str(out_dir)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out_dir / "run.stderr.txt").write_text(done.stderr[-200_000:])
    if done.returncode != 0:
        raise SystemExit(f"docbatch run failed ({done.returncode}):\n{done.stderr[-5000:]}")
    exports = [p for p in out_dir.glob("*.jsonl") if not p.name.endswith(".openai.jsonl")]
    export = max(exports, key=lambda p: p.stat().st_mtime)
    records = [json.loads(line) for line in export.read_text().splitlines()]
    parse = lambda s: __import__("datetime").datetime.fromisoformat(s).timestamp()
    first_start = min(parse(r["started_at"]) for r in records)
    last_finish = max(parse(r["finished_at"]) for r in records)
    tokens_out = sum(r["tokens_out"] for r in records)
    sizes = collections.Counter(r["batch_size"] for r in records)
    num_calls = round(sum(n / size for size, n in sizes.items()))
    return {"mode": "docbatch_run", "docs": len(records), "done": sum(r["state"] == "done" for r in records),
            "tokens_in_mean": sum(r["tokens_in"] for r in records) / len(records), "tokens_out": tokens_out,
            "generate_calls": num_calls, "batch_sizes": dict(sorted(sizes.items())),
            "seconds_first_start_to_last_finish": round(last_finish - first_start, 2),
            "out_tok_s": round(tokens_out / (last_finish - first_start), 1),
            "seconds_whole_command": round(wall, 2), "workers": sorted({r["worker"] for r in records})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (or smollm2-135m)")
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--baseline-docs", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--max-wait-ms", type=int, default=500)
    parser.add_argument("--gpus", default="auto")
    parser.add_argument("--openai", action="store_true", help="submit the documents as an OpenAI Batch file")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(home=args.out / "home", model=args.model, max_new_tokens=args.new_tokens,
                        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, ignore_eos=not args.openai,
                        max_batch_tokens=args.max_batch_size * (args.prompt_tokens + args.new_tokens + 64),
                        prepare_concurrency=min(8, os.cpu_count() or 2))
    from transformers import AutoTokenizer

    from worker.modelinfo import model_source
    source = model_source(settings)
    folder = args.out / "docs"
    write_documents(folder, args.docs, AutoTokenizer.from_pretrained(source), args.prompt_tokens)

    if args.openai:
        requests = args.out / "requests.jsonl"
        write_requests(folder, requests, args.new_tokens)
        make_prompts = lambda tokenizer: request_prompts(tokenizer, requests, args.baseline_docs)  # noqa: E731
        inputs = ["--openai-batch", str(requests)]
    else:
        make_prompts = lambda tokenizer: document_prompts(tokenizer, settings, folder, args.baseline_docs)  # noqa: E731
        inputs = [str(folder), "--task", "summarize"]
    rows = [baseline(settings, make_prompts, args.new_tokens)]
    print(json.dumps(rows[-1]), flush=True)
    rows.append(docbatch_run(settings, inputs, args.out, args.gpus))
    print(json.dumps(rows[-1]), flush=True)
    speedup = rows[1]["out_tok_s"] / rows[0]["out_tok_s"]
    (args.out / "summary.json").write_text(json.dumps({"rows": rows, "speedup": speedup}, indent=1))
    print("\n| how | docs | output tokens | seconds | output tokens/s |\n|---|---|---|---|---|")
    print(f"| one request at a time | {rows[0]['docs']} | {rows[0]['tokens_out']} | {rows[0]['seconds']} "
          f"| {rows[0]['out_tok_s']} |")
    print(f"| docbatch worker, {rows[1]['generate_calls']} generate calls, sizes {rows[1]['batch_sizes']} "
          f"| {rows[1]['docs']} | {rows[1]['tokens_out']} | {rows[1]['seconds_first_start_to_last_finish']} "
          f"| {rows[1]['out_tok_s']} |")
    print(f"speed-up {speedup:.1f}x")


if __name__ == "__main__":
    main()
