"""Where a job starts in an infer process: its claim and its prompt.

Jobs share the lane. A job under isolation (a worker died twice while holding it) starts alone: it waits
until no other job is starting, and none starts until it has. If the process dies then, the crash is
that job's (`schemas.sql.lifecycle.after_lost_run` counts it against the job); its batch-mates, started
before or after, are never blamed for it.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator


class Lane:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._num_starting = 0
        self._alone = False
        self._num_waiting_alone = 0  # isolated jobs go first, so a steady stream of others cannot starve them

    @contextlib.contextmanager
    def start(self, alone: bool) -> Iterator[None]:
        with self._changed:
            if alone:
                self._num_waiting_alone += 1
                self._changed.wait_for(lambda: not self._alone and self._num_starting == 0)
                self._num_waiting_alone -= 1
                self._alone = True
            else:
                self._changed.wait_for(lambda: not self._alone and self._num_waiting_alone == 0)
                self._num_starting += 1
        try:
            yield
        finally:
            with self._changed:
                if alone:
                    self._alone = False
                else:
                    self._num_starting -= 1
                self._changed.notify_all()
