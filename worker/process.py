"""One worker process: `python -m worker.process {infer|prepare} NAME`, started by the launcher.

An infer process loads the model once, starts the batching engine and runs Celery's threads pool on
the `infer` queue, so many tasks wait on the one engine at the same time. A prepare process runs a
prefork pool on the `prepare` queue (CPU work, isolated per child).
"""
from __future__ import annotations

import logging
import sys

from schemas.settings import Settings
from worker import runtime
from worker.celery_app import INFER_QUEUE, PREPARE_QUEUE, make_celery

log = logging.getLogger(__name__)


def start_engine(settings: Settings):
    """Load the model and start its engine: the expensive part, done once per process."""
    import torch

    from worker.engine import Engine
    from worker.generation import HFGenerator
    from worker.model import load_model

    loaded = load_model(settings)
    generator = HFGenerator(loaded.model, loaded.tokenizer)
    generator([[loaded.tokenizer.pad_token_id] * 8], [2])  # warm-up: CUDA context and kernels, off the first batch
    on_oom = torch.cuda.empty_cache if loaded.device == "cuda" else (lambda: None)
    engine = Engine(generator, max_batch_size=settings.max_batch_size,
                    max_batch_tokens=settings.max_batch_tokens, max_wait_ms=settings.max_wait_ms,
                    on_oom=on_oom).start()
    max_input_tokens = settings.max_input_tokens or loaded.context_tokens - settings.max_new_tokens
    log.info("model %s on %s, context %d tokens, input budget %d", settings.model, loaded.device,
             loaded.context_tokens, max_input_tokens)
    return engine, loaded.tokenizer, max_input_tokens


def main(role: str, name: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s")
    settings = Settings.load()
    app = make_celery(settings)
    import worker.tasks  # noqa: F401 - registers the tasks with the app

    if role == "infer":
        engine, tokenizer, max_input_tokens = start_engine(settings)
        runtime.install(runtime.Runtime(settings, name, engine, tokenizer, max_input_tokens))
        pool = ["-Q", INFER_QUEUE, "-P", "threads", "-c", str(settings.effective_max_inflight)]
    elif role == "prepare":
        runtime.install(runtime.Runtime(settings, name))
        pool = ["-Q", PREPARE_QUEUE, "-P", "prefork", "-c", str(settings.prepare_concurrency)]
    else:
        raise SystemExit(f"unknown worker role {role!r}; expected infer or prepare")
    app.worker_main(["worker", *pool, "-n", name, "-E", "--without-gossip", "--without-mingle", "-l", "INFO"])


if __name__ == "__main__":
    main(*sys.argv[1:3])
