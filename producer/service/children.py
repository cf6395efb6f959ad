"""The child processes a command starts (`docbatch up`'s services, `docbatch run`'s local worker): a `docbatch`
subcommand in a process group of its own, logging to `HOME/logs/NAME.log`, and their bounded stop.

A group of its own, so that a stop reaches the child's own children (a worker's launcher, its infer and prepare
processes and their pools) and so that a Ctrl-C at the terminal reaches only the command, which stops its children
in order (the workers still need Redis to shut down cleanly).
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

from schemas.settings import Settings


@dataclass(frozen=True)
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(cls, name: str, args: list[str], settings: Settings) -> Child:
        """`docbatch ARGS` with `settings` in its environment, in a new session (its own process group)."""
        log_path = settings.home / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "producer.cli", *args],
                                       env={**os.environ, **settings.to_env()}, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        return cls(name, process, log_path)


def stop_children(children: list[Child], grace_s: float) -> list[Child]:
    """SIGTERM to each child's process group, newest first; after `grace_s` (one deadline for them all), SIGKILL to
    every group, so that nothing of them outlives the call: neither a child that is still finishing its work (a
    worker's warm shutdown waits for every job it holds) nor what a child that did stop left in its group. Returns
    the children that had to be killed."""
    for child in reversed(children):
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    killed = []
    for child in reversed(children):
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            killed.append(child)
        _signal_group(child, signal.SIGKILL)
        child.process.wait()
    return killed


def _signal_group(child: Child, signum: int) -> None:
    # The group outlives its leader while any member lives, and its id is not reused until then.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.process.pid, signum)
