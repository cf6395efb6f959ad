"""The worker's supervisor: it starts its child processes, restarts any that exits while it is not
stopping (exit code 0 included: a child has no reason to end on its own), with a growing delay, and gives
up when one keeps dying: then it stops the others and exits non-zero, so that whatever runs the worker
(systemd, compose, Kubernetes) sees it fail instead of a worker that looks alive and takes no work.
A child that exits with `EXIT_CANNOT_START` could not start at all (its engine cannot load the model with these
settings: a model that does not fit, an architecture the engine lacks, a broken install): restarting it would only
fail again, so the supervisor stops the others and exits with that code.
A child that died while it ran a job alone (`worker.service.lane`) was killed by that job, which the sweep charges
and fails after `max_attempts` such deaths (`schemas.sql.lifecycle.after_lost_run`): the caller says so
(`killed_by_a_job`), and such a death is restarted after the first delay and counts toward neither giving up nor
the delay's growth, so that hostile documents fail one by one and never stop the worker.
A signal (SIGTERM, SIGINT) is passed to every child, and the supervisor exits 0 once they have stopped; one that
comes while the children start is passed to those started, and no more are started.
With `reap_orphans` (the `docbatch worker` launcher) the supervisor is its descendants' subreaper: what a dead child
leaves running (vLLM's engine core, which holds the GPU's memory and does not watch its parent) comes back to the
supervisor instead of living on under init, and is killed before the child starts again, and when the worker stops.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)
EXIT_GAVE_UP = 3
EXIT_CANNOT_START = 78  # sysexits' EX_CONFIG
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


@dataclass(frozen=True)
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]


@dataclass
class RestartPolicy:
    """When to restart a child that died: after `first_delay_s`, doubling while it keeps dying soon after
    its start, up to `max_delay_s` (a child that ran `stable_s` before dying starts over at `first_delay_s`);
    never more than `max_restarts` times within `window_s` (then give up)."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 300.0
    stable_s: float = 10.0
    _restarts: deque[float] = field(default_factory=deque)
    _quick_deaths: int = 0

    def next_delay_s(self, now: float, ran_s: float = 0.0, killed_by_a_job: bool = False) -> float | None:
        """The delay before the next restart of a child that ran `ran_s`, or None to give up. Records the
        restart, unless a job it ran alone killed it."""
        if killed_by_a_job:
            return self.first_delay_s
        while self._restarts and now - self._restarts[0] > self.window_s:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            return None
        if ran_s >= self.stable_s:
            self._quick_deaths = 0
        delay_s = min(self.max_delay_s, self.first_delay_s * 2 ** self._quick_deaths)
        self._quick_deaths += 1
        self._restarts.append(now)
        return delay_s


def supervise(children: list[Child], policy: type[RestartPolicy] | None = None, poll_s: float = 0.2,
              reap_orphans: bool = False, killed_by_a_job: Callable[[Child, int], bool] | None = None) -> int:
    """Run `children` until a signal (exit 0), until one cannot be kept alive (exit `EXIT_GAVE_UP`) or until one
    cannot start (exit `EXIT_CANNOT_START`). `reap_orphans`, `killed_by_a_job` (asked of a dead child and its
    pid): see the module docstring."""
    reaping = reap_orphans and _become_subreaper()
    try:
        return _supervise(children, policy or RestartPolicy, poll_s, reaping, killed_by_a_job or (lambda *_: False))
    finally:
        if reaping:
            _kill_orphans(set())


def _supervise(children: list[Child], make_policy: type[RestartPolicy], poll_s: float, reaping: bool,
               killed_by_a_job: Callable[[Child, int], bool]) -> int:
    running: dict[str, subprocess.Popen] = {}
    told: set[subprocess.Popen] = set()  # the children a stop signal was passed to
    stopping: list[int] = []

    def tell(signum: int, again: bool) -> None:
        for process in list(running.values()):
            if (again or process not in told) and process.poll() is None:
                told.add(process)
                process.send_signal(signum)

    def stop(signum, _frame) -> None:
        stopping.append(signum)
        tell(signum, again=True)  # a second Ctrl-C reaches the children too (Celery's cold shutdown)

    # the handlers come first: a signal while the children start stops those started and starts no more
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for child in children:
            if not stopping:
                running[child.name] = _start(child)
        started_at = dict.fromkeys(running, time.monotonic())
        policies = {child.name: make_policy() for child in children}
        restart_at: dict[str, float] = {}
        while not stopping:
            time.sleep(poll_s)
            now = time.monotonic()
            for child in children:
                code = running[child.name].poll()
                if code is None or stopping:
                    continue
                if reaping:
                    _kill_orphans({process.pid for process in running.values()})
                if code == EXIT_CANNOT_START:
                    log.error("%s cannot start (see its last line above); stopping the worker", child.name)
                    _stop_all(running)
                    return EXIT_CANNOT_START
                if child.name not in restart_at:
                    charged = killed_by_a_job(child, running[child.name].pid)
                    delay_s = policies[child.name].next_delay_s(now, now - started_at[child.name], charged)
                    if delay_s is None:
                        log.error("%s keeps exiting (last code %s); giving up: stopping the worker", child.name, code)
                        _stop_all(running)
                        return EXIT_GAVE_UP
                    log.warning("%s exited with code %s%s; restarting in %.0f s", child.name, code,
                                " (killed by the job it ran alone)" if charged else "", delay_s)
                    restart_at[child.name] = now + delay_s
                elif now >= restart_at[child.name]:
                    del restart_at[child.name]
                    running[child.name] = _start(child)
                    started_at[child.name] = time.monotonic()
        tell(stopping[0], again=False)  # a child that started while the signal was handled
        for process in running.values():
            process.wait()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _become_subreaper() -> bool:
    """Make this process the one its descendants' orphans are given to (Linux's child subreaper)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _kill_orphans(managed: set[int]) -> None:
    """SIGKILL the children of this (subreaper) process that it did not start (`managed`): orphans a dead child
    left, given to it. Their own children become orphans in turn and are given to it too: repeat until none."""
    while orphans := [pid for pid in _child_pids() if pid not in managed]:
        for pid in orphans:
            log.warning("killing process %d, left running by a child that died", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _child_pids() -> list[int]:
    """The ids of this process's children, read from /proc."""
    me, children = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == me:
                children.append(int(entry))
    return children


def _start(child: Child) -> subprocess.Popen:
    return subprocess.Popen(child.argv, env=child.env)


def _stop_all(running: dict[str, subprocess.Popen], timeout_s: float = 30) -> None:
    for process in running.values():
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in running.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
