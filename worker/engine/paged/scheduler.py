"""Which sequences run in the next step, and with how many tokens each: continuous batching.

Each step first serves the running sequences in admission order (a decode is one token, an unfinished
prompt gets the next chunk), then admits waiting ones while the per-step token budget, the row limit and
the free KV blocks allow. A long prompt is computed in chunks mixed with the running decodes. When a
running sequence needs a block and none is free, the most recently admitted one is preempted: its
blocks are freed (its computed prefix stays in the prefix cache until evicted) and it is recomputed
later. A sequence leaves the moment it finishes. Only the scheduler changes a sequence's status.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from worker.engine.paged.block_manager import BlockManager
from worker.engine.paged.sequence import Sequence, SequenceStatus

# The step's token budget when the settings leave it to the engine (0). The paged engine runs on a CPU, where a
# step's time grows with its tokens while every running answer waits for the step to end: at about 2.8 ms a prompt
# token on a loaded 2-core machine, 512 tokens hold them up 1.4 s, 8,192 would hold them 23 s or more.
DEFAULT_MAX_STEP_TOKENS = 512


@dataclass
class ScheduledStep:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per sequence, computed this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode_only(self) -> bool:
        """Every row computes one token that is followed by sampling (a decode step, timed apart in the statistics)."""
        return all(n == 1 and s.num_computed_tokens + 1 == s.num_tokens for s, n in zip(self.seqs, self.num_new_tokens))

    def remove(self, seqs: list[Sequence]) -> None:
        """Take `seqs` out of the step before it runs (their requests were cancelled or aborted)."""
        keep = [i for i, seq in enumerate(self.seqs) if seq not in seqs]
        self.seqs = [self.seqs[i] for i in keep]
        self.num_new_tokens = [self.num_new_tokens[i] for i in keep]

    def samples(self, index: int) -> bool:
        """Whether row `index` reaches the end of its tokens this step, so its last logits are sampled."""
        seq = self.seqs[index]
        return seq.num_computed_tokens + self.num_new_tokens[index] == seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, max_step_tokens: int, max_model_len: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_step_tokens = max_step_tokens
        self.max_model_len = max_model_len
        # Admission keeps this many blocks free, so the running sequences can grow a while before one
        # has to be preempted.
        self.watermark_blocks = max(1, blocks.num_usable_blocks // 100)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0
        self.prefix_cache_hit_tokens = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        """The next step; empty when there is nothing to run."""
        step = ScheduledStep()
        if self.waiting and self.waiting[0].is_suspect:
            self._admit(step, self.max_step_tokens, alone=True)  # a suspect runs alone, the others wait a step
            if step.seqs:
                return step
        budget = self._schedule_running(step)
        if len(step.seqs) == len(self.running):  # nobody was preempted: room to admit
            self._admit(step, budget, alone=False)
        return step

    def _schedule_running(self, step: ScheduledStep) -> int:
        budget = self.max_step_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.allocate(seq, count):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                step.seqs.append(seq)
                step.num_new_tokens.append(count)
                budget -= count
                index += 1
        return budget

    def _admit(self, step: ScheduledStep, budget: int, *, alone: bool) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.is_suspect and step.seqs:
                return
            reused = self.blocks.match_prefix(seq)
            count = min(seq.num_tokens - seq.num_computed_tokens, budget)
            reserve = 0 if not self.running else self.watermark_blocks
            if self.blocks.blocks_needed(seq, count) + reserve > self.blocks.num_free_blocks:
                self.blocks.free(seq)
                return
            self.blocks.allocate(seq, count)
            self.prefix_cache_hit_tokens += reused
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.row, seq.is_row_fresh = self._free_rows.pop(), True
            self.running.append(seq)
            step.seqs.append(seq)
            step.num_new_tokens.append(count)
            budget -= count
            if alone or seq.is_suspect:
                return

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and put it first in line; it is recomputed when it is admitted again."""
        self._requeue(seq)
        self.num_preemptions += 1

    def _requeue(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def postprocess(self, step: ScheduledStep, sampled: list[int | None]) -> list[Sequence]:
        """Record what the step computed and the tokens it sampled (None for rows mid-prompt); returns the
        sequences that finished, whose blocks are already free."""
        finished = []
        num_seqs = len(step.seqs)
        for seq, count, token in zip(step.seqs, step.num_new_tokens, sampled):
            seq.num_computed_tokens += count
            seq.max_step_seqs = max(seq.max_step_seqs, num_seqs)
            seq.is_suspect = False
            self.blocks.cache_computed(seq)
            if token is not None:
                seq.append_token(token, self.max_model_len)
            if seq.finish_reason is not None or seq.error is not None:
                self.finish(seq)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence) -> None:
        """Take `seq` out of the engine (finished, failed, or cancelled) and free what it holds."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED

    def quarantine(self, seqs: list[Sequence]) -> None:
        """The step these sequences ran in failed: recompute each of them alone, so that a request that
        breaks the model fails by itself and the others go on."""
        for seq in reversed(seqs):
            if seq.status is SequenceStatus.RUNNING:
                self._requeue(seq)
            seq.is_suspect = True

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        if seq.row is not None:
            self._free_rows.append(seq.row)
            seq.row = None
