"""The job state machine: every legal move is listed, every other one is refused, and the store is the
only writer of `state` (each change a compare-and-set)."""
from __future__ import annotations

import hashlib
import itertools

import pytest

from schemas.sql.lifecycle import after_lost_run
from schemas.states import TRANSITIONS, IllegalTransition, JobState, check_transition

S = JobState
LEGAL = {
    (S.QUEUED, S.PREPARING), (S.QUEUED, S.CANCELLED),
    (S.PREPARING, S.READY), (S.PREPARING, S.WAITING), (S.PREPARING, S.FAILED), (S.PREPARING, S.QUEUED),
    (S.PREPARING, S.CANCELLED),
    (S.READY, S.RUNNING), (S.READY, S.FAILED), (S.READY, S.CANCELLED),
    (S.RUNNING, S.DONE), (S.RUNNING, S.FAILED), (S.RUNNING, S.READY), (S.RUNNING, S.CANCELLED),
    (S.WAITING, S.DONE), (S.WAITING, S.READY), (S.WAITING, S.WAITING), (S.WAITING, S.FAILED),
    (S.WAITING, S.CANCELLED),
    (S.FAILED, S.QUEUED), (S.FAILED, S.READY), (S.CANCELLED, S.QUEUED), (S.CANCELLED, S.READY),
}


@pytest.mark.parametrize("from_state, to_state", list(itertools.product(JobState, JobState)))
def test_every_pair_of_states_is_legal_exactly_when_listed(from_state, to_state):
    if (from_state, to_state) in LEGAL:
        check_transition({from_state}, to_state)
    else:
        with pytest.raises(IllegalTransition, match=f"from {from_state.value} to {to_state.value}"):
            check_transition({from_state}, to_state)


def test_a_done_job_never_moves_and_an_ended_one_leaves_only_by_a_retry():
    assert set(TRANSITIONS) == set(JobState)
    assert TRANSITIONS[S.DONE] == frozenset()
    for state in (S.FAILED, S.CANCELLED):
        assert TRANSITIONS[state] == {S.QUEUED, S.READY}
    assert {state for state in JobState if state.is_held} == {S.PREPARING, S.RUNNING}


def test_the_store_refuses_an_illegal_move_and_changes_nothing(store):
    data = b"a contract"
    sha = hashlib.sha256(data).hexdigest()
    store.put_document(sha, data, "text/plain")
    job_id = store.create_batch("summarize", {}, "m", [("a.txt", sha)]).to_enqueue[0]
    with pytest.raises(IllegalTransition):
        store.transition([job_id], [S.QUEUED], S.DONE)
    assert store.get_job(job_id).state == S.QUEUED
    # A legal move from a state the job is not in does nothing (compare-and-set)
    assert store.transition([job_id], [S.READY], S.RUNNING) == 0
    assert store.transition([job_id], [S.QUEUED], S.CANCELLED) == 1
    assert store.get_job(job_id).state == S.CANCELLED


@pytest.mark.parametrize("state, lost_runs, isolate, expected", [
    # lost while it ran beside others: not its fault, but it runs alone next
    (S.RUNNING, 0, False, (S.READY, 1, True)),
    # the same after a loss while it was extracted
    (S.RUNNING, 1, False, (S.READY, 2, True)),
    # lost while it ran alone, within max_attempts (3): once more alone
    (S.RUNNING, 1, True, (S.READY, 2, True)),
    (S.RUNNING, 2, True, (S.READY, 3, True)),
    # lost alone past max_attempts (its third alone-run): it is the one that kills its worker
    (S.RUNNING, 3, True, (S.FAILED, 4, True)),
    # extraction runs one document per process: its losses count at once
    (S.PREPARING, 0, False, (S.QUEUED, 1, False)),
    (S.PREPARING, 2, False, (S.QUEUED, 3, False)),
    (S.PREPARING, 3, False, (S.FAILED, 4, False)),
])
def test_a_lost_run_is_charged_only_to_a_job_that_was_alone(state, lost_runs, isolate, expected):
    lost = after_lost_run(state, lost_runs, isolate, max_attempts=3)
    assert (lost.state, lost.lost_runs, lost.isolate) == expected
    assert (lost.failed_message is not None) == (lost.state == S.FAILED)


def test_a_lost_run_that_was_told_to_stop_ends_cancelled():
    # A running job `cancel` asked to stop, whose worker died before it could: it is not run again
    lost = after_lost_run(S.RUNNING, 3, True, max_attempts=3, stop_requested=True)
    assert (lost.state, lost.lost_runs, lost.failed_message) == (S.CANCELLED, 4, None)
