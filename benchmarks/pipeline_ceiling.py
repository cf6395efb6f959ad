"""How many documents per second the pipeline around the engine sustains, with a model that answers at once.

    python benchmarks/pipeline_ceiling.py --docs 1000 --new-tokens 16 --out /tmp/ceiling            # documents
    python benchmarks/pipeline_ceiling.py --docs 2000 --new-tokens 16 --openai --out /tmp/ceiling   # requests

Everything is the product's own (embedded Redis, SQLite, `docbatch worker` processes: prepare, then infer
with Celery's threads, claims, prompts, the paged engine's scheduler, blocks and futures, answer handling,
results written to SQL) except the model: the infer worker's engine runs a runner that returns a token
for every sampling row at once. Documents are small text files under the summarize task with EOS ignored,
so every answer is exactly --new-tokens free-text tokens. With --openai they go in as an OpenAI Batch
file instead: requests have nothing to extract, so the infer stage alone sets the pace. The figure to compare with is what one GPU needs:
at 10,000 output tokens/s and 256-token answers, 40 documents/s.

    python benchmarks/pipeline_ceiling.py --docs 256 --new-tokens 256 --gate 256 --out /tmp/burst     # a burst

With --gate N the engine holds every answer until N requests are in, then gives them all at once, as a GPU's batch of
fixed-length answers ends: `stored_after_release_s` is how long the process took to store the last of them.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.settings import Settings  # noqa: E402

GATE_ENV = "DOCBATCH_BENCH_GATE"  # --gate, for its process
READY = re.compile(r"celery\.apps\.worker: \S+ ready\.")  # a Celery worker's line once it takes tasks


class InstantRunner:
    """Stands in for the model runner: one token per sampling row, no computation."""

    def __init__(self, model, token_id: int) -> None:
        self.model = model
        self.token_id = token_id

    def run(self, step):
        return [self.token_id if step.samples(i) else None for i in range(len(step.seqs))]


def instant_engine(settings: Settings, loaded):
    """The real paged engine around `InstantRunner` (the small model's config gives its vocabulary)."""
    from worker.engine.paged.block_manager import BlockManager
    from worker.engine.paged.engine import PagedEngine
    from worker.engine.paged.scheduler import DEFAULT_MAX_STEP_TOKENS, Scheduler

    class Model:  # what the engine reads of a model
        vocab_size = loaded.config.vocab_size
        max_model_len = loaded.config.max_position_embeddings

    token = loaded.tokenizer("ok", add_special_tokens=False)["input_ids"][0]
    if os.environ.get(GATE_ENV):
        return GatedEngine(int(os.environ[GATE_ENV]), token)
    scheduler = Scheduler(BlockManager(65536, settings.kv_block_tokens), max_num_seqs=settings.max_batch_size,
                          max_step_tokens=settings.max_step_tokens or DEFAULT_MAX_STEP_TOKENS, max_model_len=Model.max_model_len)
    return PagedEngine(InstantRunner(Model, token), scheduler, eos_token_ids=loaded.eos_token_ids,
                       grammars=lambda: None).start()


class GatedEngine:
    """Stands in for the whole engine (`--gate N`): it answers nothing until N requests are in (or none came for a
    second), then every one of them at once, each with its max_new_tokens tokens: the burst of answers that
    fixed-length answers make on a GPU, where a batch's rows finish within a few steps of one another. What the
    process then takes to store them is the finish stage's own rate."""

    def __init__(self, gate: int, token_id: int) -> None:
        import threading

        from worker.engine.request import EngineStats

        self.gate, self.token_id, self.stats = gate, token_id, EngineStats()
        self._pending: list = []
        self._last_s = time.monotonic()
        self._lock = threading.Lock()
        threading.Thread(target=self._release, name="gated-engine", daemon=True).start()

    def submit(self, model_input, max_new_tokens: int, options=None):
        from concurrent.futures import Future

        future: Future = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            self._pending.append((future, max_new_tokens))
            self._last_s = time.monotonic()
        return future

    def abort(self, future) -> None:
        pass

    def stop(self, timeout_s: float = 10) -> None:
        pass

    def _release(self) -> None:
        import logging

        from worker.engine.request import Completion

        while True:
            time.sleep(0.01)
            with self._lock:
                if not self._pending or (len(self._pending) < self.gate and time.monotonic() - self._last_s < 1.0):
                    continue
                released, self._pending = self._pending, []
            logging.getLogger(__name__).info("%d answers released at once", len(released))  # see released_at
            for future, new_tokens in released:
                future.set_result(Completion([self.token_id] * new_tokens, len(released)))


def serve_infer(name: str) -> None:
    """This file as an infer worker process whose engine answers at once: the model's weights are not loaded (as for
    vLLM, which loads its own), only its config and tokenizer, so any model folder serves, a 7B's on a GPU host."""
    import worker.service.process

    worker.service.process.build_engine = instant_engine
    worker.service.process.uses_vllm = lambda settings: True
    worker.service.process.main("infer", name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-inflight", type=int, default=0, help="infer tasks in flight (0: the default)")
    parser.add_argument("--openai", action="store_true", help="submit OpenAI Batch requests instead of documents")
    parser.add_argument("--model", help="the model whose tokenizer and config serve (default: the packaged one)")
    parser.add_argument("--prepare-concurrency", type=int, default=0, help="prepare processes (0: the default)")
    parser.add_argument("--gate", type=int, default=0, help="answer nothing until this many requests are in, then "
                        "all at once (see GatedEngine); the summary says how long storing them took")
    parser.add_argument("--out", type=Path, default=Path("ceiling-out"))
    parser.add_argument("--infer-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.infer_worker:
        serve_infer(args.infer_worker)
        return
    from producer.service.embedded import embedded_redis

    inputs = write_inputs(args)
    with embedded_redis() as broker:
        chosen = {"model": args.model} if args.model else {}
        if args.prepare_concurrency:
            chosen["prepare_concurrency"] = args.prepare_concurrency
        settings = Settings(home=args.out / "home", broker_url=broker, ignore_eos=True, max_new_tokens=args.new_tokens,
                            max_inflight=args.max_inflight, **chosen)
        env = {**os.environ, **settings.to_env(), GATE_ENV: str(args.gate or "")}
        logs = args.out / "logs"
        logs.mkdir(exist_ok=True)
        workers = [subprocess.Popen([sys.executable, "-m", "worker.service.process", "prepare", "prepare@bench"],
                                    env=env, stdout=open(logs / "prepare.log", "wb"), stderr=subprocess.STDOUT),
                   subprocess.Popen([sys.executable, __file__, "--infer-worker", "instant@bench"], env=env,
                                    stdout=open(logs / "infer.log", "wb"), stderr=subprocess.STDOUT)]
        try:
            wait_ready(workers, [logs / "prepare.log", logs / "infer.log"], 2)
            started = time.perf_counter()
            submitted = subprocess.run([sys.executable, "-m", "producer.cli", "submit", *inputs, "--wait"], env=env,
                                       check=False, capture_output=True, text=True)
            wall = time.perf_counter() - started
            batch = submitted.stdout.split()[0]
            export = subprocess.run([sys.executable, "-m", "producer.cli", "results", batch], env=env,
                                    capture_output=True, text=True, check=True).stdout
        finally:
            for process in workers:
                process.terminate()
            for process in workers:
                process.wait(60)
    records = [json.loads(line) for line in export.splitlines()]
    print(json.dumps(summarise(records, wall, args, (logs / "infer.log").read_text()), indent=1))


def wait_ready(processes: list[subprocess.Popen], logs: list[Path], count: int, timeout_s: float = 600) -> None:
    """Until `logs` say that `count` Celery workers are ready (a benchmark's clock starts at its submit, not at the
    workers' start); SystemExit when one of `processes` exits first."""
    deadline = time.monotonic() + timeout_s
    while sum(len(READY.findall(log.read_text(errors="replace"))) for log in logs) < count:
        if any(process.poll() is not None for process in processes) or time.monotonic() > deadline:
            raise SystemExit(f"the workers did not start; see {', '.join(map(str, logs))}")
        time.sleep(0.5)


def write_inputs(args) -> list[str]:
    """Small contracts, as a folder or as an OpenAI Batch file; returns `submit`'s arguments for them."""
    args.out.mkdir(parents=True, exist_ok=True)
    texts = [f"Agreement {i} between Alpha {i} Ltd and Beta plc. Term: {1 + i % 5} years. Governed by the laws "
             f"of England.\n" for i in range(args.docs)]
    if args.openai:
        path = args.out / "requests.jsonl"
        path.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                            "body": {"model": "any", "max_tokens": args.new_tokens, "messages": [
                                                {"role": "user", "content": text + "Summarize."}]}}) + "\n"
                                for i, text in enumerate(texts)))
        return ["--openai-batch", str(path)]
    folder = args.out / "docs"
    folder.mkdir(exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"c{i:05d}.txt").write_text(text)
    return [str(folder), "--task", "summarize"]


def summarise(records: list[dict], wall: float, args, infer_log: str) -> dict:
    stamp = lambda s: dt.datetime.fromisoformat(s).timestamp()  # noqa: E731
    done = [r for r in records if r["state"] == "done"]
    first_created = min(stamp(r["created_at"]) for r in records)
    infer_start = min(stamp(r["started_at"]) for r in done)
    last_finish = max(stamp(r["finished_at"]) for r in done)
    return {"input": "openai requests" if args.openai else "documents", "docs": len(records), "done": len(done),
            "new_tokens": args.new_tokens, "cores": os.cpu_count(),
            "submit_to_last_done_s": round(last_finish - first_created, 2),
            "docs_per_s_end_to_end": round(len(done) / (last_finish - first_created), 1),
            "docs_per_s_infer_stage": round(len(done) / (last_finish - infer_start), 1),
            "output_tokens_per_s_infer_stage": round(len(done) * args.new_tokens / (last_finish - infer_start)),
            "batch_size_max": max(r["batch_size"] or 0 for r in done), "command_s": round(wall, 1),
            **({"stored_after_release_s": round(last_finish - released_at(infer_log), 2)} if args.gate else {})}


def released_at(infer_log: str) -> float:
    """When the gated engine released its answers (its log line)."""
    stamp = re.findall(r"^(\S+ \S+) INFO .*answers released at once", infer_log, re.MULTILINE)[-1]
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


if __name__ == "__main__":
    main()
