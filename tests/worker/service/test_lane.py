"""Where infer jobs run: together, except a job under isolation, which runs with nobody beside it."""
from __future__ import annotations

import threading
import time

from worker.service.lane import Lane


def test_an_isolated_job_waits_for_the_running_ones_to_finish_and_runs_with_none_beside_it():
    lane, events = Lane(), []
    running, finish = threading.Event(), threading.Event()

    def batched(name: str, hold: threading.Event | None = None) -> None:
        with lane.run(alone=False):
            events.append(f"{name} in")
            if hold:
                running.set()
                hold.wait(10)
            events.append(f"{name} out")

    def isolated(name: str) -> None:
        with lane.run(alone=True):
            events.append(f"{name} in")
            time.sleep(0.05)
            events.append(f"{name} out")

    # Given a batched job running
    a = threading.Thread(target=batched, args=("a", finish))
    a.start()
    running.wait(10)
    # When two isolated jobs and then another batched one arrive
    alone = [threading.Thread(target=isolated, args=(name,)) for name in ("x", "y")]
    for thread in alone:
        thread.start()
    while lane._num_waiting_alone < 2:
        time.sleep(0.01)
    b = threading.Thread(target=batched, args=("b",))
    b.start()
    time.sleep(0.05)
    assert events == ["a in"]  # nothing got in beside the running job
    finish.set()
    for thread in (a, *alone, b):
        thread.join(10)
    # Then each isolated job ran once the first had finished, one at a time, and the second batched job after them
    assert events[:2] == ["a in", "a out"] and events[-2:] == ["b in", "b out"]
    assert sorted(events[2:6]) == ["x in", "x out", "y in", "y out"]
    assert events[2][0] == events[3][0] and events[4][0] == events[5][0]
