"""How many threads the engine's thread computes with on a CPU: the cores other processes leave free.

torch's OpenMP threads busy-wait for one another at the end of each parallel region, and a decode step of a
small model is hundreds of regions. When another process takes one of the cores, the thread that shares it is
off its core for a scheduler slice while its partner spins: on 2 cores with other work running, a decode step
took 400 to 730 ms with 2 threads and 82 to 94 ms with 1 (docs/BENCHMARKS.md). So the engine computes with
the cores the machine has free: measured from /proc/stat, less this process's own CPU time, over the last few
seconds, and looked at again every few seconds as the load changes. A core counts as free while other
processes use less than a quarter of it.
"""
from __future__ import annotations

import logging
import math
import os
import time

log = logging.getLogger(__name__)

RECHECK_S = 3.0  # how often the engine looks at the load again (between its steps)
MIN_WINDOW_S = 0.5  # a shorter look counts too few of the kernel's 10 ms ticks to tell
BUSY_SHARE = 0.25  # a core others use more than this much of is not free
# (monotonic time, this process's CPU time, the machine's busy CPU seconds and online cores or None), in seconds
Sample = tuple[float, float, tuple[float, int] | None]


def affinity_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _machine_busy_s() -> tuple[float, int] | None:
    """(CPU seconds every core of the machine has spent busy since boot, online cores), or None without /proc.
    Busy: user, nice, system, irq, softirq and steal (a hypervisor's other guests take cores too)."""
    try:
        with open("/proc/stat") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    fields = [int(value) for value in lines[0].split()[1:9]]
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return busy / os.sysconf("SC_CLK_TCK"), cores


def threads_for(free_cores: float, cores: int) -> int:
    """Threads for `free_cores` left by other processes out of the `cores` this process may use (at least 1)."""
    return max(1, min(cores, math.floor(free_cores + BUSY_SHARE)))


class CpuThreads:
    """Sets the calling thread's torch threads (`torch.set_num_threads` is per OpenMP thread) from the free
    cores; call `adjust` from the thread that computes, between steps. `fixed` > 0 pins the count instead."""

    def __init__(self, fixed: int = 0, recheck_s: float = RECHECK_S) -> None:
        self.fixed = fixed
        self.cores = affinity_cores()
        self.recheck_s = recheck_s
        self.num_threads = 0  # not yet set
        self.others: float | None = None  # the cores other processes used over the last look
        self._last = self._sample()

    @staticmethod
    def _sample() -> Sample:
        return time.monotonic(), time.process_time(), _machine_busy_s()

    def adjust(self) -> int:
        """The thread count now in force, changed when the load has changed (looked at every `recheck_s`)."""
        wanted = self.fixed or self.num_threads
        elapsed = time.monotonic() - self._last[0]
        if not self.fixed and (not self.num_threads or elapsed >= self.recheck_s):
            if elapsed < MIN_WINDOW_S:
                wanted = self.cores
            else:
                now = self._sample()
                wanted, self._last = self._free_threads(self._last, now), now
        if wanted != self.num_threads:
            import torch

            torch.set_num_threads(wanted)
            log.info("CPU threads: %d of the %d cores this process may use (other processes used %s)", wanted,
                     self.cores, "unknown" if self.fixed or self.others is None else f"{self.others:.1f} cores")
            self.num_threads = wanted
        return wanted

    def _free_threads(self, before: Sample, after: Sample) -> int:
        if before[2] is None or after[2] is None:
            return self.cores
        elapsed = after[0] - before[0]
        machine_busy = after[2][0] - before[2][0]
        own_busy = after[1] - before[1]
        self.others = max(0.0, (machine_busy - own_busy) / elapsed)
        free = min(self.cores, after[2][1] - self.others)
        return threads_for(free, self.cores)
