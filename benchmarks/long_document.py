"""One long document through `docbatch run`, reporting how it was chunked, mapped and reduced.

    python benchmarks/long_document.py FOLDER --out /tmp/long [--model M] [--new-tokens N]

Prints the document job's state, chunk count, prompt tokens of the reduce step and the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.settings import Settings  # noqa: E402
from schemas.sql.store import Store  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    settings = Settings(home=args.out / "home", model=args.model, max_new_tokens=args.new_tokens)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "producer.cli", "run", str(args.folder), "--task", "summarize",
                           "--out-dir", str(args.out)], env={**os.environ, **settings.to_env()},
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"docbatch run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    store = Store(settings.effective_database_url)
    batch_id = store.latest_batch_ids(1)[0]
    for item, job, result in store.batch_rows(batch_id):
        levels = {}
        for level in range(1, (job.chunk_level or 0) + 1):
            levels[level] = len(store.chunk_outputs(job.id, level))
        print(json.dumps({"document": item.name, "state": job.state.value, "pages": len(store.load_pages(
            job.document_sha256) or []), "chunks_per_level": levels, "reduce_tokens_in": job.tokens_in,
            "tokens_out": job.tokens_out, "seconds_whole_run": round(seconds, 1),
            "summary_start": (result.data["text"][:300] if result else None)}))


if __name__ == "__main__":
    main()
