"""Continuous batching decisions, without a model: a fake 'model' appends token 7 for each sampling row."""
from __future__ import annotations

from worker.engine.paged.block_manager import BlockManager
from worker.engine.paged.scheduler import Scheduler
from worker.engine.paged.sequence import Sequence, SequenceStatus


def _scheduler(num_blocks=64, block_size=4, max_num_seqs=8, max_step_tokens=32, max_model_len=1000):
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs=max_num_seqs, max_step_tokens=max_step_tokens,
                     max_model_len=max_model_len)


def _step(scheduler):
    """Schedule and 'run' one step; returns (step, finished). `step.sampled` lists the rows that sampled."""
    step = scheduler.schedule()
    step.sampled = [i for i in range(len(step.seqs)) if step.samples(i)]
    return step, scheduler.postprocess(step, [7 if i in step.sampled else None for i in range(len(step.seqs))])


def _drain(scheduler, limit=1000):
    finished = []
    for _ in range(limit):
        if not scheduler.has_work:
            return finished
        finished += _step(scheduler)[1]
    raise AssertionError("the scheduler did not finish its work")


def test_a_long_prompt_is_computed_in_chunks_mixed_with_running_decodes():
    scheduler = _scheduler(max_step_tokens=16)
    short = Sequence(list(range(5)), max_new_tokens=10)
    scheduler.add(short)
    _step(scheduler)  # short's prompt
    long = Sequence(list(range(100, 140)), max_new_tokens=2)
    scheduler.add(long)
    # When the long prompt joins
    step, _ = _step(scheduler)
    # Then the step holds short's decode (1 token) and a 15-token chunk of the long prompt
    assert step.seqs == [short, long] and step.num_new_tokens == [1, 15]
    assert step.sampled == [0]  # a prompt chunk that does not reach the prompt's end samples nothing
    step, _ = _step(scheduler)
    assert step.num_new_tokens == [1, 15]
    step, _ = _step(scheduler)
    assert step.num_new_tokens == [1, 10] and step.sampled == [0, 1]  # the last chunk samples its first token


def test_a_sequence_leaves_the_moment_it_finishes_and_a_waiting_one_takes_its_row():
    scheduler = _scheduler(max_num_seqs=2)
    quick, slow, waiting = (Sequence([1, 2, 3], max_new_tokens=n) for n in (1, 5, 2))
    for seq in (quick, slow, waiting):
        scheduler.add(seq)
    step, finished = _step(scheduler)
    assert step.seqs == [quick, slow] and finished == [quick]
    assert quick.status is SequenceStatus.FINISHED and quick.block_table == []
    step, _ = _step(scheduler)
    assert step.seqs == [slow, waiting]  # joined at once, while slow decodes


def test_eos_ends_a_sequence_and_is_not_part_of_the_answer():
    scheduler = _scheduler()
    seq = Sequence([1, 2], max_new_tokens=10, eos_token_ids=frozenset({7}))
    scheduler.add(seq)
    _, finished = _step(scheduler)
    assert finished == [seq] and seq.finish_reason == "stop" and seq.completion_token_ids == []


def test_running_out_of_blocks_preempts_the_newest_and_everything_still_finishes():
    # 6 usable blocks of 4 tokens: two sequences of 6 prompt + 10 new tokens need 8 blocks at the end
    scheduler = _scheduler(num_blocks=7, block_size=4, max_step_tokens=64)
    seqs = [Sequence(list(range(10 * i, 10 * i + 6)), max_new_tokens=10) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    finished = _drain(scheduler)
    assert sorted(s.seq_id for s in finished) == sorted(s.seq_id for s in seqs)
    assert scheduler.num_preemptions >= 1
    assert all(s.completion_token_ids == [7] * 10 for s in seqs)
    assert scheduler.blocks.num_used_blocks == 0


def test_a_failed_step_runs_its_sequences_alone_until_each_succeeds():
    scheduler = _scheduler()
    a, b = Sequence([1, 2, 3], max_new_tokens=3), Sequence([4, 5, 6], max_new_tokens=3)
    scheduler.add(a)
    scheduler.add(b)
    step = scheduler.schedule()
    assert step.seqs == [a, b]
    # When that step fails
    scheduler.quarantine(step.seqs)
    # Then each runs alone next, and once it has succeeded it batches normally again
    step, _ = _step(scheduler)
    assert step.seqs == [a]
    step, _ = _step(scheduler)
    assert step.seqs == [b]
    step, _ = _step(scheduler)
    assert step.seqs == [a, b]
    assert scheduler.blocks.num_used_blocks > 0 and scheduler.num_preemptions == 0


def test_admission_respects_the_row_limit_and_the_token_budget():
    scheduler = _scheduler(max_num_seqs=3, max_step_tokens=10)
    seqs = [Sequence([i] * 4, max_new_tokens=2) for i in range(5)]
    for seq in seqs:
        scheduler.add(seq)
    step = scheduler.schedule()
    assert step.seqs == seqs[:3] and step.num_new_tokens == [4, 4, 2]
    assert len(scheduler.waiting) == 2
