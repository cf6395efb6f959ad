"""docbatch's paged engine through the product path against the best static-batch `generate`, one run.

    python benchmarks/engine_throughput.py --model /tmp/q7b --workload A --out /tmp/bench

Workloads (random-weight models: answers are noise, costs are real; every answer has a fixed length):
  A     256 contracts of ~1,080 prompt tokens, 256 new tokens each
  B     256 contracts of 345 to 4,048 prompt tokens, 256 new tokens each
  C     256 contracts of ~1,080 prompt tokens, 64 to 512 new tokens (fixed per document)
  json  256 requests of ~1,080 tokens, up to 256 new tokens: once free, once under ContractSummary's JSON
        schema (constrained decoding), answers ending where they end (EOS not ignored)

1. Baseline: the same prompts through transformers' `generate` in static batches (left padded, as a team
   would batch by hand): `--baseline-batch` rows per call, sorted by prompt length (B) or answer length (C).
2. docbatch: `python -m producer.cli run` over a folder (A, B: summarize task) or an OpenAI Batch file (C,
   json), with an embedded Redis, SQLite and a local worker; output tokens/s is the answers' tokens over
   the time from the first job's start to the last one's finish.
3. Rooflines for the GPU it ran on: decode only (weights plus the batch's KV cache read once per step, at
   the memory bandwidth) and full (that plus the prompts' FLOPs at the peak bf16 rate).
`--gpus` is passed to docbatch's worker: `0,1` measures data parallelism (a worker per GPU pulling from the
queue), `0+1` tensor parallelism (one model over both GPUs).
Prints a JSON line per measurement and a table; writes summary.json under --out.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the baseline OOMs on B without
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.outputs import ContractSummary  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from schemas.tasks import builtin_task  # noqa: E402

CLAUSE = ("Clause {k}. The Supplier shall deliver the goods listed in Schedule {k} to the Customer's site within "
          "{d} business days of each purchase order, and the Customer shall pay each undisputed invoice within "
          "thirty days of receipt, failing which interest accrues at one percent per month. ")
# Datasheet figures (dense bf16, HBM): the rooflines' inputs
GPUS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}


def contract(i: int, tokenizer, tokens: int) -> str:
    text, k = f"Supply agreement no. {i} between Party {i} Ltd and Party {i + 1} plc.\n", 0
    step = len(tokenizer(CLAUSE.format(k=0, d=5), add_special_tokens=False)["input_ids"])
    while True:
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count >= tokens - 60:
            return text
        for _ in range(max(1, (tokens - 60 - count) // step - 1)):
            text += CLAUSE.format(k=k, d=5 + (i + k) % 20)
            k += 1


def workload(name: str, docs: int) -> tuple[list[int], list[int]]:
    """(document tokens, new tokens) per document, deterministic."""
    if name == "B":
        lengths = [345 + (4048 - 345) * ((i * 97) % docs) // (docs - 1) for i in range(docs)]
        return lengths, [256] * docs
    if name == "C":
        return [1024] * docs, [64 + (i * 193) % 449 for i in range(docs)]
    return [1024] * docs, [256] * docs


def build_inputs(name: str, out: Path, tokenizer, settings: Settings, docs: int):
    """Writes the inputs; returns (docbatch run arguments, baseline prompts [token ids], new tokens, schema)."""
    from worker.answers.prompts import build_text_prompt, chat_tokens

    lengths, new_tokens = workload(name, docs)
    texts = [contract(i, tokenizer, n) for i, n in enumerate(lengths)]
    if name in ("A", "B"):
        folder = out / "docs"
        folder.mkdir(parents=True, exist_ok=True)
        render = builtin_task("summarize", settings).render
        for i, text in enumerate(texts):
            (folder / f"contract_{i:04d}.txt").write_text(text)
        prompts = [build_text_prompt(tokenizer, render, t, 100_000).model_input.token_ids for t in texts]
        return [str(folder), "--task", "summarize"], prompts, new_tokens, None
    schema = ContractSummary.model_json_schema() if name == "json-schema" else None
    lines, prompts = [], []
    for i, text in enumerate(texts):
        messages = [{"role": "user", "content": text + "\n\nSummarize this contract."}]
        body = {"model": "any", "max_tokens": new_tokens[i], "temperature": 0, "messages": messages}
        if schema:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "contract", "schema": schema}}
        lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
        prompts.append(chat_tokens(tokenizer, messages))
    (out / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return ["--openai-batch", str(out / "requests.jsonl")], prompts, new_tokens, schema


def baseline(settings: Settings, prompts: list[list[int]], new_tokens: list[int], batch: int, order: str,
             schema) -> dict:
    """Static batches through transformers' generate, as many rows per call as `batch`."""
    import torch

    from worker.engine.request import GenerationOptions, ModelInput
    from worker.engine.hf_generator import HFGenerator
    from worker.models.loading import load_model

    loaded = load_model(settings.model_copy(update={"engine": "hf"}))
    generator = HFGenerator(loaded.model, loaded.tokenizer, loaded.eos_token_ids)
    options = GenerationOptions(repetition_penalty=settings.repetition_penalty, ignore_eos=settings.ignore_eos)
    key = (lambda i: len(prompts[i])) if order == "prompt" else (lambda i: new_tokens[i])
    indices = sorted(range(len(prompts)), key=key) if order != "none" else list(range(len(prompts)))
    inputs = [ModelInput(p, json_schema=json.dumps(schema) if schema else None) for p in prompts]
    generator(inputs[:batch], [8] * min(batch, len(inputs)), options)  # the first call of a shape is slower
    torch.cuda.synchronize()
    started, tokens_out = time.perf_counter(), 0
    for start in range(0, len(indices), batch):
        rows = indices[start:start + batch]
        outputs = generator([inputs[i] for i in rows], [new_tokens[i] for i in rows], options)
        tokens_out += sum(len(o) for o in outputs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30
    del generator, loaded
    torch.cuda.empty_cache()
    return {"mode": f"static generate, batch {batch}, sorted by {order}", "docs": len(prompts),
            "tokens_out": tokens_out, "seconds": round(seconds, 2), "out_tok_s": round(tokens_out / seconds, 1),
            "docs_s": round(len(prompts) / seconds, 2), "peak_gib": round(peak, 1)}


def docbatch_run(settings: Settings, arguments: list[str], out: Path, gpus: str = "0") -> dict:
    env = {**os.environ, **settings.to_env()}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "producer.cli", "run", *arguments, "--gpus", gpus,
                           "--out-dir", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out / "run.stderr.txt").write_text(done.stderr[-200_000:])
    if done.returncode not in (0, 1):
        raise SystemExit(f"docbatch run failed ({done.returncode}):\n{done.stderr[-5000:]}")
    export = max((p for p in out.glob("*.jsonl") if not p.name.endswith(".openai.jsonl") and p.name != "requests.jsonl"),
                 key=lambda p: p.stat().st_mtime)
    records = [json.loads(line) for line in export.read_text().splitlines()]
    stamp = lambda s: dt.datetime.fromisoformat(s).timestamp()  # noqa: E731
    span = max(stamp(r["finished_at"]) for r in records) - min(stamp(r["started_at"]) for r in records)
    tokens_out = sum(r["tokens_out"] or 0 for r in records)
    log = (settings.home / "logs" / "worker.log").read_text()
    return {"mode": "docbatch run (paged engine)", "docs": len(records),
            "done": sum(r["state"] == "done" for r in records), "tokens_out": tokens_out,
            "seconds": round(span, 2), "out_tok_s": round(tokens_out / span, 1), "docs_s": round(len(records) / span, 2),
            "seconds_whole_command": round(wall, 2), "engine": _last(r"paged engine: .*", log),
            "stats": _last(r"engine stats: .*", log), "finish": dict(_finish_reasons(records))}


def _last(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


def _finish_reasons(records: list[dict]):
    reasons: dict[str, int] = {}
    for r in records:
        key = (r.get("result") or {}).get("finish_reason") or r["state"]
        reasons[key] = reasons.get(key, 0) + 1
    return sorted(reasons.items())


def rooflines(prompts: list[list[int]], new_tokens: list[int], max_batch: int) -> dict:
    """Floors in seconds for the GPU this runs on, for Qwen2.5-7B's shape."""
    import torch

    name = torch.cuda.get_device_name(0)
    bandwidth, flops = next((v for k, v in GPUS.items() if k in name), GPUS["H100"])
    params, weight_bytes, kv_bytes_per_token, layers, width = 7.62e9, 15.23e9, 57_344, 28, 3584
    steps = [0] * (max(new_tokens) + 1)  # sequences decoding at each answer position, all admitted together
    kv_read = 0.0
    for prompt, new in zip(prompts, new_tokens):
        kv_read += kv_bytes_per_token * (len(prompt) * new + new * (new - 1) / 2)
        for j in range(new):
            steps[j] += 1
    weight_reads = sum(-(-rows // max_batch) for rows in steps if rows)
    decode_s = (weight_reads * weight_bytes + kv_read) / bandwidth
    prompt_tokens = sum(len(p) for p in prompts)
    attention_flops = sum(2 * 2 * layers * width * len(p) ** 2 / 2 for p in prompts)
    prefill_s = (2 * params * prompt_tokens + attention_flops) / flops
    tokens = sum(new_tokens)
    return {"gpu": name, "decode_roofline_tok_s": round(tokens / decode_s), "full_roofline_tok_s":
            round(tokens / (decode_s + prefill_s)), "decode_floor_s": round(decode_s, 2),
            "prefill_floor_s": round(prefill_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (benchmarks/make_random_model.py)")
    parser.add_argument("--workload", choices=["A", "B", "C", "json"], required=True)
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--baseline-batch", type=int, help="rows per static generate call (A: 256, B: 64, C: 64)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--max-batch-size", type=int, default=256, help="docbatch: sequences per engine step")
    parser.add_argument("--gpus", default="0", help="docbatch's --gpus: 0; 0,1 (data parallel: a worker per GPU); "
                                                    "0+1 (tensor parallel: one model over both)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    from transformers import AutoTokenizer

    rows = []
    names = ["json-free", "json-schema"] if args.workload == "json" else [args.workload]
    for name in names:
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        settings = Settings(home=out / "home", model=args.model, max_new_tokens=256, ignore_eos=name in ("A", "B", "C"),
                            max_batch_size=args.max_batch_size, prepare_concurrency=min(8, os.cpu_count() or 2))
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        arguments, prompts, new_tokens, schema = build_inputs(name, out, tokenizer, settings, args.docs)
        batch = args.baseline_batch or {"B": 64, "C": 64}.get(name, 256)
        order = {"B": "prompt", "C": "answer"}.get(name, "none")
        # json compares docbatch with itself (constrained against free), so it needs no generate baseline
        skip = args.skip_baseline or args.workload == "json"
        measured = [] if skip else [baseline(settings, prompts, new_tokens, batch, order, schema)]
        measured.append(docbatch_run(settings, arguments, out, args.gpus))
        for row in measured:
            row["workload"] = name
            print(json.dumps(row), flush=True)
        roof = rooflines(prompts, new_tokens, args.max_batch_size)
        print(json.dumps(roof), flush=True)
        rows.append({"workload": name, "measured": measured, "roofline": roof,
                     "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts)),
                     "new_tokens": [min(new_tokens), max(new_tokens)]})
    (args.out / f"summary-{args.workload}.json").write_text(json.dumps(rows, indent=1))
    print("\n| workload | how | output tok/s | docs/s | seconds | vs baseline | of full roofline |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = row["measured"][0]["out_tok_s"]
        for m in row["measured"]:
            print(f"| {row['workload']} | {m['mode']} | {m['out_tok_s']:,} | {m['docs_s']} | {m['seconds']} "
                  f"| {m['out_tok_s'] / base:.2f}x | {m['out_tok_s'] / row['roofline']['full_roofline_tok_s']:.0%} |")


if __name__ == "__main__":
    main()
