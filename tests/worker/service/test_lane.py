"""Where infer jobs start: together, except a job under isolation, which starts with nobody beside it."""
from __future__ import annotations

import threading
import time

from worker.service.lane import Lane


def test_an_isolated_start_waits_for_the_others_and_holds_them_off():
    lane, events = Lane(), []
    first_in, release_first = threading.Event(), threading.Event()

    def batched(name: str, hold: threading.Event | None = None) -> None:
        with lane.start(alone=False):
            events.append(f"{name} in")
            if hold:
                first_in.set()
                hold.wait(10)
            events.append(f"{name} out")

    def isolated() -> None:
        with lane.start(alone=True):
            events.append("alone in")
            time.sleep(0.05)
            events.append("alone out")

    # Given a batched job starting
    a = threading.Thread(target=batched, args=("a", release_first))
    a.start()
    first_in.wait(10)
    # When an isolated job and then another batched one arrive
    alone = threading.Thread(target=isolated)
    alone.start()
    while lane._num_waiting_alone == 0:
        time.sleep(0.01)
    b = threading.Thread(target=batched, args=("b",))
    b.start()
    time.sleep(0.05)
    release_first.set()
    for thread in (a, alone, b):
        thread.join(10)
    # Then the isolated job started only once the first had, and the second waited for it
    assert events == ["a in", "a out", "alone in", "alone out", "b in", "b out"]
