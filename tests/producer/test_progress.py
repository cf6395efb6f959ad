"""The progress line of `--wait` when stderr is a log: one unit everywhere (jobs and the chunks of long
documents), the rate of the last minute, an ETA, the tokens generated, and the workers' tokens per second, so
that a batch whose answers take long never looks hung. Snapshots are made in the test (times included)."""
from __future__ import annotations

import io
from collections import Counter

from rich.console import Console

from producer.results.progress import Pace, Snapshot, _PlainLines, progress_text
from schemas.states import JobState as S


def _snapshot(at_s: float, done: int, tokens_out: int, workers: float | None = None, running: int = 4,
              total: int = 42, failed: int = 9, cancelled: int = 2) -> Snapshot:
    units = Counter({S.DONE: done, S.FAILED: failed, S.CANCELLED: cancelled, S.RUNNING: running})
    units[S.QUEUED] = total - sum(units.values())
    return Snapshot(+units, tokens_out, at_s, workers)


def test_the_line_counts_units_alike_and_adds_up():
    pace = Pace()
    snapshot = _snapshot(0, done=18, tokens_out=3120)
    pace.add(snapshot)
    # done + failed + cancelled is what finished; finished + running + pending is the total
    assert progress_text(snapshot, pace) == ("29/42 finished (done 18, failed 9, cancelled 2), running 4, pending 9; "
                                             "3,120 tokens generated")


def test_the_rate_is_the_last_minutes_and_the_eta_follows_it():
    # Given a batch that finished 12 units in its first minute, then 3 in the next one
    pace = Pace()
    for at_s, done in ((0, 0), (30, 6), (60, 12), (90, 13), (120, 15)):
        pace.add(_snapshot(at_s, done=done, tokens_out=100 * done, failed=0, cancelled=0))
    # Then the rate is the last minute's, not the average since the start, and the ETA is the rest at that rate
    assert pace.units_per_s() == 3 / 60
    assert pace.eta_s() == (42 - 15) / (3 / 60)
    assert "; 0.05/s now, ETA 9m00s; 1,500 tokens generated" in progress_text(pace._seen[-1], pace)


def test_a_batch_whose_answers_take_long_shows_the_workers_generating_and_an_eta():
    # Given 10 units done in the first minute, then none for ten minutes while the workers' engines generate
    pace = Pace()
    pace.add(_snapshot(0, done=0, tokens_out=0, workers=1000.0, failed=0, cancelled=0))
    pace.add(_snapshot(60, done=10, tokens_out=2000, workers=3000.0, failed=0, cancelled=0))
    for minute in range(2, 12):
        last = _snapshot(60 * minute, done=10, tokens_out=2000, workers=3000.0 + 2400 * (minute - 1), failed=0,
                         cancelled=0)
        pace.add(last)
    # Then the rate says nothing finished lately, the ETA falls back on the whole wait's average, and the
    # workers' tokens per second say the engines work
    text = progress_text(last, pace)
    assert "; 0.00/s now, ETA 35m12s;" in text  # 32 units left, at 10 per 11 minutes
    assert text.endswith("2,000 tokens generated, workers at 40 tok/s")


def test_before_anything_ends_there_is_no_eta_yet_and_plain_lines_come_every_ten_seconds():
    out = io.StringIO()
    lines = _PlainLines(Console(file=out, width=300), "4b15a7601234567890abcdef12345678")
    pace = Pace()
    for at_s in (0, 5, 10.5):
        snapshot = _snapshot(at_s, done=0, tokens_out=0, failed=0, cancelled=0)
        pace.add(snapshot)
        lines(snapshot, pace, is_finished=False)
    printed = out.getvalue().splitlines()
    assert len(printed) == 2 and all(line.startswith("batch 4b15a760: 0/42 finished") for line in printed)
    assert printed[1].endswith("; 0.00/s now, ETA once one has ended; 0 tokens generated")
