"""Plain vLLM, as a team would script it: `vllm.LLM(model)` with its defaults and one `LLM.generate` per workload over
the very token ids docbatch sends (written by `engine_throughput.py`), greedy, EOS ignored, fixed answer lengths.

    python benchmarks/vllm_baseline.py --model /tmp/q7b --inputs /tmp/bench/A/inputs.json,... --out baseline.json

The prefix cache is reset before each workload (one engine would otherwise reuse the last workload's prefixes and
inflate the figures), and a short warm-up runs first. Runs in a process of its own, so that its GPU memory is free
again before docbatch's worker starts. Prints and writes a JSON record per workload.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True, help="comma-separated inputs.json files, one per workload")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=args.model, gpu_memory_utilization=args.gpu_memory_utilization, seed=0)
    engine_start_s = time.perf_counter() - started
    cache = llm.llm_engine.vllm_config.cache_config
    records = []
    for path in args.inputs.split(","):
        workload = json.loads(Path(path).read_text())
        prompts = [{"prompt_token_ids": ids} for ids in workload["prompts"]]
        params = [SamplingParams(max_tokens=n, temperature=0, repetition_penalty=workload["repetition_penalty"],
                                 ignore_eos=True, detokenize=False) for n in workload["new_tokens"]]
        if workload.get("images"):
            from PIL import Image

            for prompt, images in zip(prompts, workload["images"]):
                prompt["multi_modal_data"] = {"image": [Image.open(image) for image in images]}
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up: first calls of new shapes
        llm.reset_prefix_cache()
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
        tokens_out = sum(len(o.outputs[0].token_ids) for o in outputs)
        record = {"workload": workload["name"], "mode": "plain vLLM LLM.generate", "docs": len(prompts),
                  "tokens_out": tokens_out, "seconds": round(seconds, 2), "out_tok_s": round(tokens_out / seconds, 1),
                  "docs_s": round(len(prompts) / seconds, 2), "engine_start_s": round(engine_start_s, 1),
                  "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size}
        print(json.dumps(record), flush=True)
        records.append(record)
    args.out.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
