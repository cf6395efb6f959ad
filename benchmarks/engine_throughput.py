"""docbatch's product path against plain vLLM on the same token ids, in one call on one GPU.

    python benchmarks/engine_throughput.py --model /tmp/q7b --workloads A,B,C,D --out /tmp/bench

Workloads (random-weight models: answers are noise, costs are real; every answer has a fixed length, EOS ignored;
each workload's documents are its own, so no workload reads another's prefixes):
  A  256 contracts of ~1,080 prompt tokens, 256 new tokens each
  B  256 contracts of 345 to 4,048 prompt tokens, 256 new tokens each
  C  256 contracts of ~1,080 prompt tokens, 64 to 512 new tokens (fixed per document; an OpenAI Batch file)
  D  128 contracts of ~8,000 prompt tokens, 512 new tokens each (a real contract summary is prefill-heavy)
  T  two tasks over D's 128 contracts (summarize and extract, 256 requests, 512 new tokens each), submitted as two
     batches at once; the baseline runs them as one `generate` in the conventional layout, the instructions before
     the document ("T instruction-first"), and in docbatch's, the document first ("T document-first")
  V  128 page images (a contract page rendered at 1,000 x 1,400 pixels, ~1,800 image tokens), 256 new tokens each,
     through a vision model (`make_random_model.py --vision`: Qwen2.5-VL-7B's shape)

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
from functools import partial
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas.settings import Settings  # noqa: E402
from schemas.tasks import DOCUMENT, INSTRUCTIONS, builtin_task  # noqa: E402
from pipeline_ceiling import wait_ready  # noqa: E402

CLAUSE = ("Clause {k}. The Supplier shall deliver the goods listed in Schedule {k} to the Customer's site within "
          "{d} business days of each purchase order, and the Customer shall pay each undisputed invoice within "
          "thirty days of receipt, failing which interest accrues at one percent per month. ")
# Datasheet figures (dense bf16, HBM): the rooflines' inputs
GPUS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}
WORKLOADS = {  # name: (documents, prompt tokens per document or None for B's spread, new tokens or None for C's)
    "A": (256, 1024, 256), "B": (256, None, 256), "C": (256, 1024, None), "D": (128, 8000, 512),
    "T": (128, 8000, 512), "V": (128, 600, 256)}
TASKS = {"T": ("summarize", "extract")}  # a workload's tasks (default: summarize)


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


def page_image(text: str, path: Path) -> None:
    """`text` typeset on a white page of 1,000 x 1,400 pixels, as a scan of it would look."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (1000, 1400), "white")
    draw, font = ImageDraw.Draw(page), ImageFont.load_default(size=18)
    lines, line = [], ""
    for word in text.split():
        if draw.textlength(f"{line} {word}", font=font) > 900:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    for row, line in enumerate([*lines, line][:56]):
        draw.text((50, 50 + row * 23), line, fill="black", font=font)
    page.save(path)


def instruction_first(task, text: str) -> str:
    """A built-in task's user turn in the conventional layout: its instructions, then the document (docbatch's
    built-in tasks put the document first)."""
    return f"{INSTRUCTIONS[task.name]}\n\n{DOCUMENT.replace('{{ text }}', text)}"


def build_inputs(name: str, out: Path, tokenizer, settings: Settings, docs: int | None) -> list[list[str]]:
    """Writes the documents and `inputs.json` (the token ids docbatch will send; T's also in the conventional layout,
    `instruction_first.json`); returns each `submit`'s arguments (T: two, run at once)."""
    from worker.answers.prompts import build_text_prompt, chat_tokens
    from worker.documents.extract import extract_pages
    from worker.documents.inputs import document_parts

    lengths, new_tokens = workload(name, docs)
    texts = [contract(name, i, tokenizer, n) for i, n in enumerate(lengths)]
    if name == "V":
        return vision_inputs(out, texts, new_tokens, settings)
    if name == "C":
        lines, prompts = [], []
        for i, text in enumerate(texts):
            messages = [{"role": "user", "content": text + "\n\nSummarize this contract."}]
            body = {"model": "any", "max_tokens": new_tokens[i], "temperature": 0, "messages": messages}
            lines.append(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                     "body": body}))
            prompts.append(chat_tokens(tokenizer, messages))
        (out / "requests.jsonl").write_text("\n".join(lines) + "\n")
        submits = [["--openai-batch", str(out / "requests.jsonl")]]
    else:
        folder = out / "docs"
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(texts):
            (folder / f"contract_{i:04d}.txt").write_text(text)
        # the worker's own reading of each file (its pages, labelled and joined), so the token ids are the ones it sends
        read = ["\n\n".join(part["text"] for part in document_parts(
            [SimpleNamespace(text=page.text, image_sha256=None) for page in extract_pages(path.read_bytes())],
            False, None)) for path in sorted(folder.iterdir())]
        tasks = [builtin_task(task, settings) for task in TASKS.get(name, ("summarize",))]
        prompts = [build_text_prompt(tokenizer, task.render, text, 100_000).model_input.token_ids
                   for task in tasks for text in read]
        new_tokens = new_tokens * len(tasks)
        submits = [[str(folder), "--task", task.name] for task in tasks]
        if len(tasks) > 1:  # the conventional layout: each task's instructions, then the document
            conventional = [build_text_prompt(tokenizer, partial(instruction_first, task), text, 100_000)
                            .model_input.token_ids for task in tasks for text in read]
            (out / "instruction_first.json").write_text(json.dumps({
                "name": f"{name} instruction-first", "prompts": conventional, "new_tokens": new_tokens,
                "repetition_penalty": settings.repetition_penalty}))
    # C's requests run as OpenAI chat requests: no repetition penalty, as OpenAI decodes (the tasks: the settings')
    penalty = 1.0 if name == "C" else settings.repetition_penalty
    (out / "inputs.json").write_text(json.dumps({"name": name, "prompts": prompts, "new_tokens": new_tokens,
                                                 "repetition_penalty": penalty}))
    return submits


def vision_inputs(out: Path, texts: list[str], new_tokens: list[int], settings: Settings) -> list[list[str]]:
    """V: each contract's first page as a PNG; the token ids the worker builds for each (its processor expands every
    image into its placeholders: `prompt_tokens` counts them), and for the baseline the same ids with one placeholder
    per image, as the vLLM engine hands them over, beside the image it sends."""
    from worker.documents.extract import extract_pages
    from worker.engine.vllm_engine import one_placeholder_per_image
    from worker.models.loading import load_model
    from worker.models.vision import build_vision_prompt

    folder, images = out / "docs", out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    images.mkdir(exist_ok=True)
    processor = load_model(settings, weights=False).processor
    around = builtin_task("summarize", settings).around_text()
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    prompts, counts, sent = [], [], []
    for i, text in enumerate(texts):
        page_image(text, folder / f"contract_{i:04d}.png")
        image = extract_pages((folder / f"contract_{i:04d}.png").read_bytes())[0].image.convert("RGB")
        image.save(images / f"{i:04d}.png")
        token_ids = build_vision_prompt(processor, around, [image], 100_000).model_input.token_ids
        counts.append(len(token_ids))
        prompts.append(one_placeholder_per_image(token_ids, image_pad))
        sent.append([str(images / f"{i:04d}.png")])
    (out / "inputs.json").write_text(json.dumps({"name": "V", "prompts": prompts, "prompt_tokens": counts,
                                                 "images": sent, "new_tokens": new_tokens,
                                                 "repetition_penalty": settings.repetition_penalty}))
    return [[str(folder), "--task", "summarize"]]


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
            wait_ready([worker], [log_path], 2)  # prepare, infer
            yield worker
        finally:
            worker.terminate()
            worker.wait(120)


def docbatch_submit(settings: Settings, submits: list[list[str]], out: Path, name: str, new_tokens: int) -> dict:
    """One workload through `docbatch submit --wait` (T: two at once) and `docbatch results`: throughput from the job
    records."""
    env = {**os.environ, **settings.to_env(), "DOCBATCH_MAX_NEW_TOKENS": str(new_tokens), "DOCBATCH_IGNORE_EOS": "true"}
    running = []
    for i, arguments in enumerate(submits):
        with open(out / f"submit{i}.stderr.txt", "wb") as stderr:
            running.append(subprocess.Popen([sys.executable, "-m", "producer.cli", "submit", *arguments, "--wait"],
                                            env=env, stdout=subprocess.PIPE, stderr=stderr, text=True))
    records = []
    for i, submit in enumerate(running):
        stdout = submit.communicate()[0]
        if submit.returncode not in (0, 1):
            raise SystemExit(f"docbatch submit failed ({submit.returncode}): see {out}/submit{i}.stderr.txt")
        export = subprocess.run([sys.executable, "-m", "producer.cli", "results", stdout.strip().splitlines()[0]],
                                env=env, capture_output=True, text=True, check=True)
        records += [json.loads(line) for line in export.stdout.splitlines()]
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # each job's times, kept
    stamp = lambda s: dt.datetime.fromisoformat(s).timestamp()  # noqa: E731
    starts = sorted(stamp(r["started_at"]) for r in records)
    span = max(stamp(r["finished_at"]) for r in records) - starts[0]
    tokens_out = sum(r["tokens_out"] or 0 for r in records)
    # the intake ramp: when the jobs reached the engine, from the first job's start (half of them, all of them)
    ramp = {"half_started_s": round(starts[len(starts) // 2] - starts[0], 2),
            "all_started_s": round(starts[-1] - starts[0], 2),
            "first_start_after_submit_s": round(starts[0] - min(stamp(r["created_at"]) for r in records), 2)}
    return {"workload": name, "mode": f"docbatch worker + submit ({settings.engine} engine)", "docs": len(records),
            "done": sum(r["state"] == "done" for r in records), "tokens_out": tokens_out,
            "tokens_in": sum(r["tokens_in"] or 0 for r in records), "seconds": round(span, 2),
            "out_tok_s": round(tokens_out / span, 1), "docs_s": round(len(records) / span, 2), **ramp}


def _last(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text)
    return found[-1] if found else None


def shared_prefix_tokens(prompts: list[list[int]], tasks: int) -> int:
    """The prompt tokens that a document's later tasks share with its first (`prompts`: each task's, task by task)."""
    per_task = len(prompts) // tasks
    shared = 0
    for i in range(per_task):
        first = prompts[i]
        for later in prompts[i + per_task::per_task]:
            shared += next((k for k, (a, b) in enumerate(zip(first, later)) if a != b), min(len(first), len(later)))
    return shared


def rooflines(prompts: list[list[int]], new_tokens: list[int], max_batch: int, shared: int = 0,
              prompt_tokens: list[int] | None = None) -> dict:
    """Floors in seconds for the GPU this runs on, for Qwen2.5-7B's shape; `shared` prompt tokens are computed once
    (a document's later tasks read them from the prefix cache); `prompt_tokens`: the prompts' lengths once images are
    expanded into their placeholders (the vision encoder's own work is not counted)."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    bandwidth, flops = next((v for k, v in GPUS.items() if k in name), GPUS["H100"])
    params, weight_bytes, kv_bytes_per_token, layers, width = 7.62e9, 15.23e9, 57_344, 28, 3584
    steps = [0] * (max(new_tokens) + 1)  # sequences decoding at each answer position, all admitted together
    kv_read = 0.0
    lengths = prompt_tokens or [len(p) for p in prompts]
    for length, new in zip(lengths, new_tokens):
        kv_read += kv_bytes_per_token * (length * new + new * (new - 1) / 2)
        for j in range(new):
            steps[j] += 1
    weight_reads = sum(-(-rows // max_batch) for rows in steps if rows)
    decode_s = (weight_reads * weight_bytes + kv_read) / bandwidth
    attention_flops = sum(2 * 2 * layers * width * length ** 2 / 2 for length in lengths)
    prefill_s = (2 * params * (sum(lengths) - shared) + attention_flops) / flops
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
    files = [path for n in names for path in (args.out / n / "instruction_first.json", args.out / n / "inputs.json")
             if path.exists()]
    base = {} if args.skip_baseline else vllm_baseline(args.model, files, args.out, args.gpu_memory_utilization)
    rows = []
    with docbatch_worker(settings, args.gpus, args.out / "worker.log"):
        for name in names:
            measured = docbatch_submit(settings, submits[name], args.out / name, name, max(inputs[name]["new_tokens"]))
            # the prompt tokens docbatch computed are the baseline's (its prompt building is the worker's own)
            given = inputs[name]
            lengths = given.get("prompt_tokens") or [len(p) for p in given["prompts"]]
            measured["same_prompt_tokens"] = measured["tokens_in"] == sum(lengths)
            print(json.dumps(measured), flush=True)
            shared = shared_prefix_tokens(given["prompts"], len(submits[name]))
            roof = rooflines(given["prompts"], given["new_tokens"], args.max_batch_size, shared, lengths)
            print(json.dumps(roof), flush=True)
            rows.append({"workload": name, "vllm": base.get(name), "docbatch": measured, "roofline": roof,
                         "vllm_instruction_first": base.get(f"{name} instruction-first"),
                         "prompt_tokens_mean": round(sum(lengths) / len(lengths)), "shared_prefix_tokens": shared})
    log = (args.out / "worker.log").read_text()
    summary = {"rows": rows, "engine": _last(r"vLLM engine: .*|paged engine: .*", log),
               "stats": _last(r"engine stats: .*", log)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n| workload | plain vLLM out tok/s | docbatch out tok/s | docbatch / vLLM | full roofline | vLLM | docbatch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ours, roof = row["docbatch"]["out_tok_s"], row["roofline"]["full_roofline_tok_s"]
        for label, baseline in ((row["workload"], row["vllm"]),
                                (f"{row['workload']} against instruction-first", row["vllm_instruction_first"])):
            if label != row["workload"] and not baseline:
                continue
            theirs = (baseline or {}).get("out_tok_s")
            ratio = f"{ours / theirs:.2f}x" if theirs else "-"
            print(f"| {label} | {theirs or '-'} | {ours} | {ratio} | {roof} | "
                  f"{f'{theirs / roof:.0%}' if theirs else '-'} | {ours / roof:.0%} |")


if __name__ == "__main__":
    main()
