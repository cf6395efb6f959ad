"""docbatch's product path against plain vLLM on the same token ids, in one call on one GPU.

    python benchmarks/engine_throughput.py --model /tmp/q7b --workloads A,B,C,D --out /tmp/bench

Workloads (random-weight models: answers are noise, costs are real; every answer has a fixed length, EOS ignored;
each workload's documents are its own, so no workload reads another's prefixes):
  A  256 contracts of ~1,080 prompt tokens, 256 new tokens each
  B  256 contracts of 345 to 4,048 prompt tokens, 256 new tokens each
  C  256 contracts of ~1,080 prompt tokens, 64 to 512 new tokens (fixed per document; an OpenAI Batch file)
  D  128 contracts of ~8,000 prompt tokens, 512 new tokens each (a real contract summary is prefill-heavy)

1. Inputs: the documents as files (A, B, D: the summarize task; C: an OpenAI Batch file) and the token ids docbatch
   sends for each, built by docbatch's own prompt code (`inputs.json` per workload).
2. Baseline: `benchmarks/vllm_baseline.py` in a process of its own: `vllm.LLM(model)` with its defaults, one
   `LLM.generate` per workload over those token ids, the prefix cache reset before each.
3. docbatch: one `docbatch worker --gpus 0` (the engine `auto` picks: vLLM on a GPU), then per workload
   `docbatch submit ... --wait` and its export; output tokens/s is the answers' tokens over the time from the first
   job's start to the last one's finish (the engine's start is not counted; prompts are extracted, built and
   claimed while the engine runs, as in production).
4. Rooflines for the GPU (Qwen2.5-7B's shape): decode (weights plus each step's KV read at the memory bandwidth)
   and full (that plus the prompts' FLOPs at the peak bf16 rate).
`--engine paged` runs docbatch's own engine instead (settings `engine=paged`); `--skip-baseline` skips step 2.
Prints a JSON line per measurement and a table; writes summary.json under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas.settings import Settings  # noqa: E402
from schemas.tasks import builtin_task  # noqa: E402

CLAUSE = ("Clause {k}. The Supplier shall deliver the goods listed in Schedule {k} to the Customer's site within "
          "{d} business days of each purchase order, and the Customer shall pay each undisputed invoice within "
          "thirty days of receipt, failing which interest accrues at one percent per month. ")
# Datasheet figures (dense bf16, HBM): the rooflines' inputs
GPUS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}
WORKLOADS = {  # name: (documents, prompt tokens per document or None for B's spread, new tokens or None for C's)
    "A": (256, 1024, 256), "B": (256, None, 256), "C": (256, 1024, None), "D": (128, 8000, 512)}


def contract(label: str, i: int, tokenizer, tokens: int) -> str:
    text, k = f"Supply agreement {label}-{i} between Party {i} Ltd and Party {i + 1} plc.\n", 0
    step = len(tokenizer(CLAUSE.format(k=0, d=5), add_special_tokens=False)["input_ids"])
    while True:
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if count >= tokens - 60:
            return text
        for _ in range(max(1, (tokens - 60 - count) // step - 1)):
            text += CLAUSE.format(k=k, d=5 + (i + k) % 20)
            k += 1


def workload(name: str, docs: int | None) -> tuple[list[int], list[int]]:
    """(document tokens, new tokens) per document, deterministic."""
    default_docs, tokens, new = WORKLOADS[name]
    docs = docs or default_docs
    lengths = [345 + (4048 - 345) * ((i * 97) % docs) // max(1, docs - 1) for i in range(docs)] if tokens is None \
        else [tokens] * docs
    news = [64 + (i * 193) % 449 for i in range(docs)] if new is None else [new] * docs
    return lengths, news


def build_inputs(name: str, out: Path, tokenizer, settings: Settings, docs: int | None) -> list[str]:
    """Writes the documents and `inputs.json` (the token ids docbatch will send); returns `submit`'s arguments."""
    from worker.answers.prompts import build_text_prompt, chat_tokens
    from worker.documents.extract import extract_pages
    from worker.documents.inputs import document_parts

    lengths, new_tokens = workload(name, docs)
    texts = [contract(name, i, tokenizer, n) for i, n in enumerate(lengths)]
    if name == "C":
        lines, prompts = [], []
        for i, text in enumerate(texts):
            messages = [{"role": "user", "content": text + "\n\nSummarize this contract."}]
            body = {"model": "any", "max_tokens": new_tokens[i], "temperature": 0, "messages": messages}
            lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": body}))
            prompts.append(chat_tokens(tokenizer, messages))
        (out / "requests.jsonl").write_text("\n".join(lines) + "\n")
        arguments = ["--openai-batch", str(out / "requests.jsonl")]
    else:
        folder = out / "docs"
        folder.mkdir(parents=True, exist_ok=True)
        render = builtin_task("summarize", settings).render
        for i, text in enumerate(texts):
            (folder / f"contract_{i:04d}.txt").write_text(text)
        # the worker's own reading of each file (its pages, labelled and joined), so the token ids are the ones it sends
        read = ["\n\n".join(part["text"] for part in document_parts(
            [SimpleNamespace(text=page.text, image_sha256=None) for page in extract_pages(path.read_bytes())],
            False, None)) for path in sorted(folder.iterdir())]
        prompts = [build_text_prompt(tokenizer, render, text, 100_000).model_input.token_ids for text in read]
        arguments = [str(folder), "--task", "summarize"]
    # C's requests run as OpenAI chat requests: no repetition penalty, as OpenAI decodes (the tasks: the settings')
    penalty = 1.0 if name == "C" else settings.repetition_penalty
    (out / "inputs.json").write_text(json.dumps({"name": name, "prompts": prompts, "new_tokens": new_tokens,
                                                 "repetition_penalty": penalty}))
    return arguments


def vllm_baseline(model: str, inputs: list[Path], out: Path, gpu_memory_utilization: float) -> dict[str, dict]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_baseline.py"), "--model", model,
                           "--inputs", ",".join(map(str, inputs)), "--out", str(out / "baseline.json"),
                           "--gpu-memory-utilization", str(gpu_memory_utilization)],
                          capture_output=True, text=True)
    (out / "baseline.log").write_text(done.stdout[-100_000:] + done.stderr[-200_000:])
    if done.returncode:
        raise SystemExit(f"the vLLM baseline failed ({done.returncode}):\n{done.stderr[-5000:]}")
    return {r["workload"]: r for r in json.loads((out / "baseline.json").read_text())}


@contextlib.contextmanager
def docbatch_worker(settings: Settings, gpus: str, log_path: Path):
    """`docbatch worker --gpus GPUS`, until it has started its engine."""
    env = {**os.environ, **settings.to_env()}
    with open(log_path, "ab") as log:
        worker = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", gpus], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while len(re.findall(r"celery.apps.worker: \S+ ready\.", log_path.read_text())) < 2:  # prepare, infer
                if worker.poll() is not None:
                    raise SystemExit(f"the worker exited ({worker.returncode}); see {log_path}")
                time.sleep(1)
            yield worker
        finally:
            worker.terminate()
            worker.wait(120)


def docbatch_submit(settings: Settings, arguments: list[str], out: Path, name: str, new_tokens: int) -> dict:
    """One workload through `docbatch submit --wait` and `docbatch results`: throughput from the job records."""
    env = {**os.environ, **settings.to_env(), "DOCBATCH_MAX_NEW_TOKENS": str(new_tokens), "DOCBATCH_IGNORE_EOS": "true"}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "submit", *arguments, "--wait"], env=env,
                          capture_output=True, text=True)
    (out / "submit.stderr.txt").write_text(done.stderr[-200_000:])
    if done.returncode not in (0, 1):
        raise SystemExit(f"docbatch submit failed ({done.returncode}):\n{done.stderr[-5000:]}")
    batch = done.stdout.strip().splitlines()[0]
    export = subprocess.run([sys.executable, "-m", "producer.cli", "results", batch], env=env, capture_output=True,
                            text=True, check=True)
    records = [json.loads(line) for line in export.stdout.splitlines()]
    stamp = lambda s: dt.datetime.fromisoformat(s).timestamp()  # noqa: E731
    span = max(stamp(r["finished_at"]) for r in records) - min(stamp(r["started_at"]) for r in records)
    tokens_out = sum(r["tokens_out"] or 0 for r in records)
    return {"workload": name, "mode": f"docbatch worker + submit ({settings.engine} engine)", "docs": len(records),
            "done": sum(r["state"] == "done" for r in records), "tokens_out": tokens_out,
            "tokens_in": sum(r["tokens_in"] or 0 for r in records), "seconds": round(span, 2),
            "out_tok_s": round(tokens_out / span, 1), "docs_s": round(len(records) / span, 2)}


def _last(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


def rooflines(prompts: list[list[int]], new_tokens: list[int], max_batch: int) -> dict:
    """Floors in seconds for the GPU this runs on, for Qwen2.5-7B's shape."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
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
    parser.add_argument("--workloads", default="A,B,C,D")
    parser.add_argument("--docs", type=int, help="documents per workload (default: the workload's own)")
    parser.add_argument("--engine", choices=["auto", "vllm", "paged"], default="auto", help="docbatch's engine")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="both engines' share of the GPU")
    parser.add_argument("--max-batch-size", type=int, default=256, help="docbatch: rows per engine step")
    parser.add_argument("--gpus", default="0", help="docbatch's --gpus")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    from producer.service.embedded import embedded_redis

    args.out.mkdir(parents=True, exist_ok=True)
    with embedded_redis() as broker_url:  # a Redis of this run's own: nothing else in its queues
        settings = Settings(home=args.out / "home", model=args.model, engine=args.engine,
                            max_batch_size=args.max_batch_size, gpu_memory_utilization=args.gpu_memory_utilization,
                            metrics_port=0, prepare_concurrency=min(8, os.cpu_count() or 2), broker_url=broker_url)
        run(args, settings)


def run(args: argparse.Namespace, settings: Settings) -> None:
    from transformers import AutoTokenizer

    names = args.workloads.split(",")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    submits = {}
    for name in names:
        (args.out / name).mkdir(exist_ok=True)
        submits[name] = build_inputs(name, args.out / name, tokenizer, settings, args.docs)
    inputs = {name: json.loads((args.out / name / "inputs.json").read_text()) for name in names}
    base = {} if args.skip_baseline else vllm_baseline(args.model, [args.out / n / "inputs.json" for n in names],
                                                       args.out, args.gpu_memory_utilization)
    rows = []
    with docbatch_worker(settings, args.gpus, args.out / "worker.log"):
        for name in names:
            measured = docbatch_submit(settings, submits[name], args.out / name, name, max(inputs[name]["new_tokens"]))
            # the prompt tokens docbatch computed are the baseline's (its prompt building is the worker's own)
            measured["same_prompt_tokens"] = measured["tokens_in"] == sum(map(len, inputs[name]["prompts"]))
            print(json.dumps(measured), flush=True)
            roof = rooflines(inputs[name]["prompts"], inputs[name]["new_tokens"], args.max_batch_size)
            print(json.dumps(roof), flush=True)
            rows.append({"workload": name, "vllm": base.get(name), "docbatch": measured, "roofline": roof,
                         "prompt_tokens_mean": round(sum(map(len, inputs[name]["prompts"])) / len(inputs[name]["prompts"]))})
    log = (args.out / "worker.log").read_text()
    summary = {"rows": rows, "engine": _last(r"vLLM engine: .*|paged engine: .*", log),
               "stats": _last(r"engine stats: .*", log)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n| workload | plain vLLM out tok/s | docbatch out tok/s | docbatch / vLLM | full roofline | vLLM | docbatch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ours, theirs, roof = row["docbatch"]["out_tok_s"], (row["vllm"] or {}).get("out_tok_s"), \
            row["roofline"]["full_roofline_tok_s"]
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        print(f"| {row['workload']} | {theirs or '-'} | {ours} | {ratio} | {roof} | "
              f"{f'{theirs / roof:.0%}' if theirs else '-'} | {ours / roof:.0%} |")


if __name__ == "__main__":
    main()
