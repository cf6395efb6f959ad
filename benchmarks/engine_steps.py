"""Step-level timings of the paged engine on a GPU: what one decode step and one prompt chunk cost.

    python benchmarks/engine_steps.py --model /tmp/q7b --batch 64,128,256 --context 1280

Builds the engine as a worker does (memory profiled, KV cache sized, graphs captured), fills the cache
with `--batch` sequences of `--context` tokens, then times with CUDA events (median of `--repeats`):
  - a decode step through the runner, replayed from a CUDA graph and eager (sampling included);
  - attention alone per layer at that shape: FlashInfer's paged decode against the plain-PyTorch path;
  - a prompt chunk of `max_step_tokens` tokens (prefill throughput).
Prints one JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from schemas.settings import Settings  # noqa: E402
from worker.engine.request import GenerationOptions  # noqa: E402
from worker.engine.builder import build_engine  # noqa: E402
from worker.engine.paged.attention import TorchAttention  # noqa: E402
from worker.engine.paged.scheduler import ScheduledStep  # noqa: E402
from worker.engine.paged.sequence import Sequence  # noqa: E402
from worker.engine.paged.step_inputs import StepInputs  # noqa: E402
from worker.models.loading import load_model  # noqa: E402


def timed_ms(run, repeats: int = 50) -> float:
    """The median of `repeats` runs of `run` on the GPU, in ms (CUDA events), after one warm-up run."""
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fill(engine, batch: int, context: int) -> list[Sequence]:
    """`batch` sequences whose first `context - 1` tokens are in the cache, each about to decode."""
    blocks, runner = engine.scheduler.blocks, engine.runner
    seqs = []
    for row in range(batch):
        seq = Sequence(torch.randint(100, 30000, (context,)).tolist(), 10**6, GenerationOptions(repetition_penalty=1.1))
        blocks.allocate(seq, context)
        seq.row, seq.is_row_fresh = row, True
        runner.run(ScheduledStep([seq], [context - 1]))  # the prompt up to its last token: nothing sampled
        seq.num_computed_tokens = context - 1
        seqs.append(seq)
    return seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", default="64,128,256")
    parser.add_argument("--context", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    batches = [int(b) for b in args.batch.split(",")]
    settings = Settings(model=args.model, engine="paged", max_batch_size=max(batches))
    engine = build_engine(settings, load_model(settings))
    engine.stop()  # the loop thread: the steps below are driven by hand
    runner, model = engine.runner, engine.runner.model
    print(json.dumps({"kv_blocks": engine.stats.kv_blocks_total, "kv_tokens": engine.stats.kv_blocks_total * 16,
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}), flush=True)
    for batch in batches:
        seqs = fill(engine, batch, args.context)
        step = ScheduledStep(seqs, [1] * batch)
        inputs = StepInputs.build(step, 16, model.device)
        graphs = runner.graphs
        graph_ms = timed_ms(lambda: runner.run(step), args.repeats)
        runner.graphs = None
        eager_ms = timed_ms(lambda: runner.run(step), args.repeats)
        runner.graphs = graphs
        q = torch.randn(batch, model.heads.num_heads, model.heads.head_dim, dtype=model.dtype, device=model.device)
        k = torch.randn(batch, model.heads.num_kv_heads, model.heads.head_dim, dtype=model.dtype, device=model.device)
        flash = runner.attention.plan(inputs)
        plain = TorchAttention(runner.cache, model.heads).plan(inputs)
        print(json.dumps({"batch": batch, "context": args.context, "decode_step_ms_graph": round(graph_ms, 2),
                          "decode_step_ms_eager": round(eager_ms, 2),
                          "attention_layer_ms_flashinfer": round(timed_ms(lambda: flash(0, q, k, k), args.repeats), 3),
                          "attention_layer_ms_torch": round(timed_ms(lambda: plain(0, q, k, k), 5), 3)}), flush=True)
        for seq in seqs:
            engine.scheduler.blocks.free(seq)
    chunk = Sequence(torch.randint(100, 30000, (settings.max_step_tokens + 1,)).tolist(), 1)
    engine.scheduler.blocks.allocate(chunk, chunk.num_tokens)
    prefill = ScheduledStep([chunk], [settings.max_step_tokens])
    prefill_ms = timed_ms(lambda: runner.run(prefill), 5)
    flops = 2 * sum(p.numel() for p in model.parameters()) * settings.max_step_tokens
    print(json.dumps({"prefill_tokens": settings.max_step_tokens, "prefill_step_ms": round(prefill_ms, 1),
                      "prefill_tok_s": round(settings.max_step_tokens / prefill_ms * 1000),
                      "tflops": round(flops / prefill_ms / 1e9, 1)}), flush=True)


if __name__ == "__main__":
    main()
