"""The engine thread's torch threads: the cores other processes leave free, looked at again as the load changes."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import torch

from worker.engine.cpu_threads import CpuThreads, affinity_cores, threads_for


def test_a_core_counts_as_free_while_others_use_less_than_a_quarter_of_it():
    assert threads_for(2.0, 2) == 2 and threads_for(1.8, 2) == 2
    assert threads_for(1.7, 2) == 1 and threads_for(1.0, 2) == 1
    assert threads_for(0.0, 2) == 1  # never none
    assert threads_for(16.0, 4) == 4  # never more than this process may use


def _on_a_thread(fn):
    """`fn()` on a fresh thread, as the engine's: torch's thread count is per OpenMP thread."""
    result = []
    thread = threading.Thread(target=lambda: result.append((fn(), torch.get_num_threads())))
    thread.start()
    thread.join()
    return result[0]


def test_busy_cores_take_threads_away_and_the_calling_thread_alone_is_changed():
    # Given a process busy on every core this process may use
    cores = affinity_cores()
    main_threads = torch.get_num_threads()
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        threads = CpuThreads(recheck_s=0.5)

        def settled() -> int:
            threads.adjust()  # the first look, too soon to tell: every core
            time.sleep(1.0)
            return threads.adjust()  # a second's look at the load

        # When the engine's thread looks at the load
        chosen, in_force = _on_a_thread(settled)
    finally:
        for process in spin:
            process.kill()
            process.wait()
    # Then it computes with one thread, and the other threads keep theirs
    assert chosen == in_force == 1
    assert torch.get_num_threads() == main_threads


def test_a_fixed_count_is_kept_whatever_the_load():
    assert _on_a_thread(CpuThreads(fixed=1).adjust) == (1, 1)
