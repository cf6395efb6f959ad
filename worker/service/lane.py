"""Where infer jobs run in a process: together, or one alone.

Jobs share the lane. A job under isolation (its process died while it ran beside others:
`schemas.sql.lifecycle.after_lost_run`) runs alone: the lane lets no job in any more, waits until the jobs inside
have left (their answers stored), lets the isolated job through with nothing beside it (its claim, its prompt,
its requests in the engine, its answer), and opens again once it has left. If the process dies meanwhile, the
death is that job's, and no other job lost a run to it. Isolated jobs go first, so that a steady stream of others
cannot starve them.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class Lane:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._num_inside = 0  # jobs running together
        self._alone = False  # an isolated job is inside
        self._num_waiting_alone = 0

    @contextlib.contextmanager
    def run(self, alone: bool) -> Iterator[None]:
        """Hold the caller until its job may run, for as long as it runs: `alone`, until no other job is inside
        (and none gets in until it has left); otherwise until no isolated job runs or waits."""
        with self._changed:
            if alone:
                self._num_waiting_alone += 1
                self._changed.wait_for(lambda: not self._alone and self._num_inside == 0)
                self._num_waiting_alone -= 1
                self._alone = True
            else:
                self._changed.wait_for(lambda: not self._alone and self._num_waiting_alone == 0)
                self._num_inside += 1
        try:
            yield
        finally:
            with self._changed:
                if alone:
                    self._alone = False
                else:
                    self._num_inside -= 1
                self._changed.notify_all()
