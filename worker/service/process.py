"""One worker process: `python -m worker.service.process {infer|prepare} NAME`, started by the launcher.

An infer process loads the model once, starts the batching engine and runs Celery's threads pool on
the `infer` queue, so many tasks wait on the one engine at the same time. A prepare process runs a
prefork pool on the `prepare` queue: CPU work, each child under an address-space limit, each file
under a time limit, so a hostile file costs one failed job and at most one child.
"""
from __future__ import annotations

import logging
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from celery import current_app
from celery.signals import task_failure, worker_process_init, worker_ready

from schemas.messages import INFER_QUEUE, PREPARE_QUEUE, PREPARE_TASK, make_celery
from schemas.passwords import WeakPassword, check_passwords
from schemas.settings import Settings
from worker.service import runtime
from worker.engine.builder import build_engine, uses_vllm
from worker.service.keeper import Keeper
from worker.service.middleware import fail_hard_timeout
from worker.service.redis_transport import mend_channel_close
from worker.service.supervisor import EXIT_CANNOT_START
from worker.telemetry.exporter import start_telemetry

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """The model or its engine cannot load with these settings (it does not fit, the engine lacks its architecture,
    the install is broken): starting again would fail again."""


def start_engine(settings: Settings, name: str) -> runtime.Runtime:
    """Load the model and start its engine (the expensive part, done once per process): the runtime
    every infer task of this process shares."""
    from worker.models.loading import load_model
    from worker.models.info import ModelInfo, input_budget

    started = time.perf_counter()
    vllm = uses_vllm(settings)  # vLLM loads the weights itself: here only the tokenizer (and processor)
    try:
        loaded = on_a_passing_thread(load_model, settings, weights=not vllm)
        engine = on_a_passing_thread(build_engine, settings, loaded)
        if loaded.is_vision and getattr(engine, "processes_images", False):  # vLLM compiles its image path at first use
            from worker.models.vision import warm_up

            log.info("vision engine warmed up with a blank page in %.1f s",
                     warm_up(engine, loaded.processor, input_budget(settings, loaded.context_tokens)))
    except Exception as error:  # noqa: BLE001 - whatever stops the model from loading is said in one line
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise EngineStartError(f"the {'vllm' if vllm else settings.engine} engine cannot load {settings.model}: "
                               f"{type(error).__name__}: {first_line}") from error
    if hasattr(engine, "on_fatal"):
        engine.on_fatal = _exit_for_restart
    engine.stats.model_load_s = time.perf_counter() - started
    info = ModelInfo(loaded.is_vision, loaded.context_tokens, loaded.tokenizer)
    log.info("model %s on %s in %s (%s, %s engine), context %d tokens, input budget %d", settings.model,
             loaded.device, loaded.precision, "vision" if loaded.is_vision else "text", type(engine).__name__,
             loaded.context_tokens, input_budget(settings, loaded.context_tokens))
    return runtime.Runtime(settings, name, engine, loaded.tokenizer, loaded.processor, info)


def on_a_passing_thread(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on a thread that ends with it, so that the engine's thread is the only one that ever
    computes. libgomp keeps an OpenMP pool for each thread that ran a parallel region, as long as the thread
    lives; with a second pool alive there are more OpenMP threads than CPUs, and the engine thread's workers
    sleep between regions instead of spinning: a decode step of the small model on 2 cores took twice as long."""
    with ThreadPoolExecutor(1, thread_name_prefix="docbatch-load") as pool:
        return pool.submit(fn, *args, **kwargs).result()


def _exit_for_restart(error: BaseException) -> None:
    """The engine cannot go on: end this process at once, so that the supervisor starts a fresh one and the
    jobs it held come back by their leases (waiting task threads would otherwise keep them forever)."""
    logging.shutdown()
    os._exit(70)


def _limit_memory(settings: Settings) -> None:
    """Cap a prepare child's address space at what it maps now plus `prepare_memory_mb`: a decompression
    bomb then raises MemoryError in its own task instead of drawing the kernel's OOM killer."""
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * resource.getpagesize()
    limit = mapped + settings.prepare_memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _keeper(rt: runtime.Runtime, role: str, *, sweeps: bool, register: bool = True) -> Keeper:
    """This process's lease renewals (and sweeps, and for an infer process the stops `cancel` asked), started now."""
    return Keeper(rt.settings, rt.store, rt.holder, rt.held, role, sweeps=sweeps, app=rt.app, register=register,
                  on_stop=rt.stop_jobs if role == "infer" else None).start()


def _hard_timeouts_fail(rt: runtime.Runtime):
    """A prepare parent's `task_failure` handler: Celery reports there the children it killed at the hard
    time limit."""
    def handler(sender=None, exception=None, args=(), **_) -> None:
        if sender is not None and sender.name == PREPARE_TASK and args:
            fail_hard_timeout(rt, args[0], exception)
    return handler


def configure(settings: Settings, role: str, name: str) -> list[str]:
    """Make this process an `infer` or `prepare` worker named `name` (its runtime, keeper, signals and
    telemetry); returns the Celery worker options its pool needs.

    Every process that claims jobs renews their leases: the infer process, and each prepare child. The
    infer process and the prepare parent also sweep for lost work. A weak password in the settings stops it.
    Either consumer outlives a Redis outage (`worker.service.redis_transport`)."""
    try:
        check_passwords(settings)
    except WeakPassword as e:
        raise SystemExit(str(e)) from e
    mend_channel_close()
    app = current_app._get_current_object()  # made by main(), or by Celery's own command line
    if role == "infer":
        rt = start_engine(settings, name)
        rt.app = app
        runtime.install(rt)
        _keeper(rt, "infer", sweeps=True)
        pool = ["-Q", INFER_QUEUE, "-P", "threads", "-c", str(settings.effective_max_inflight)]
    elif role == "prepare":
        from worker.models.info import model_info

        model_info(settings)  # tokenizer and libraries loaded before the fork, outside the children's limit
        # Tesseract's own OpenMP threads cost 2.7x the CPU per page on 2 cores (docs/BENCHMARKS.md):
        # parallelism comes from the prefork children instead.
        os.environ.setdefault("OMP_THREAD_LIMIT", "1")
        rt = runtime.Runtime(settings, name, app=app)
        runtime.install(rt)
        # Started once the pool's children are forked, so that no child inherits a thread's locks mid-use.
        worker_ready.connect(lambda **_: _keeper(rt, "prepare", sweeps=True, register=False), weak=False)
        worker_process_init.connect(lambda **_: (_limit_memory(settings), _keeper(rt, "prepare", sweeps=False)),
                                    weak=False)
        task_failure.connect(_hard_timeouts_fail(rt), weak=False)
        pool = ["-Q", PREPARE_QUEUE, "-P", "prefork", "-c", str(settings.prepare_concurrency)]
    else:
        raise SystemExit(f"unknown worker role {role!r}; expected infer or prepare")
    start_telemetry(settings, role, name)
    return pool


def main(role: str, name: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s")
    settings = Settings.load()
    app = make_celery(settings)
    import worker.service.tasks  # noqa: F401 - registers the tasks with the app

    try:
        pool = configure(settings, role, name)
    except EngineStartError as error:
        log.error("%s", error, exc_info=error.__cause__)
        log.critical("%s cannot start: %s", name, error)
        _exit_now(EXIT_CANNOT_START)
    code: int | str | None = 0
    try:
        app.worker_main(["worker", *pool, "-n", name, "-E", "--without-gossip", "--without-mingle", "-l", "INFO"])
    except SystemExit as done:
        code = done.code
    if role == "infer":
        runtime.current().engine.stop()  # vLLM's engine core is a process of its own: it ends with its engine
    _exit_now(code)


def _exit_now(code: int | str | None) -> None:
    """End the process once Celery has shut down, without the interpreter's own teardown: freeing torch's and
    transformers' modules took about 1.5 s a process on 2 cores, on every stop and every restart. Nothing is
    left to flush but the logs (leases lapse on their own; connections close with the process), and the engine has
    been stopped."""
    logging.shutdown()
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)

if __name__ == "__main__":
    main(*sys.argv[1:3])
