"""How `docbatch run` takes its stop signals (`producer.run.StopSignals`): raised where run can unwind, kept for later
where it cannot, counted once. The whole command stopped mid-batch is tests/system/test_run_stop.py."""
from __future__ import annotations

import os
import signal

import pytest

from producer.run import StopSignals, Stopped


def test_a_signal_outside_an_interruptible_step_is_kept_for_the_next_one_and_only_the_first_counts():
    # Given run's signal handlers, and no step that may be interrupted under way (say, the worker being stopped)
    signals = StopSignals()
    before = signal.getsignal(signal.SIGHUP)
    with signals.installed():
        # When SIGHUP comes, then SIGTERM
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)

        # Then nothing is raised there; the next interruptible step raises the first signal, with its exit code
        with pytest.raises(Stopped) as stopped, signals.interruptible():
            pass
        assert (stopped.value.signum, stopped.value.exit_code, str(stopped.value)) == (signal.SIGHUP, 129, "SIGHUP")

    # ... and the handlers that were there before come back
    assert signal.getsignal(signal.SIGHUP) is before


def test_a_signal_inside_an_interruptible_step_stops_it_at_once():
    signals = StopSignals()
    with signals.installed(), pytest.raises(Stopped) as stopped, signals.interruptible():
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("the step went on after SIGTERM")
    assert stopped.value.exit_code == 143
