"""One request as the paged engine tracks it: its tokens, its KV blocks, where it stands."""
from __future__ import annotations

import enum
import itertools
from typing import Any

from worker.engine.request import GenerationOptions

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted: holds no KV blocks
    RUNNING = "running"  # holds KV blocks; computes prompt chunks or decodes
    FINISHED = "finished"


class Sequence:
    """Prompt and generated tokens of one request, with its block table and progress.

    `num_computed_tokens` counts the tokens whose keys and values are in the cache (prefix-cache hits
    included). A step computes tokens `[num_computed_tokens, num_computed_tokens + n)`; when that reaches
    `num_tokens`, the step's last logits give the next token. Only the scheduler changes `status`.
    """

    def __init__(self, token_ids: list[int], max_new_tokens: int, options: GenerationOptions = GenerationOptions(),
                 *, eos_token_ids: frozenset[int] = frozenset(), matcher: Any = None) -> None:
        self.seq_id = next(_ids)
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.max_new_tokens = max_new_tokens
        self.options = options
        self.eos_token_ids = frozenset() if options.ignore_eos else eos_token_ids
        self.matcher = matcher  # llguidance matcher of a constrained request, None for free text
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks computed so far
        self.num_computed_tokens = 0
        self.row: int | None = None  # the sampler's per-row slot while running
        self.is_row_fresh = False  # the sampler has not yet seen this sequence's tokens in its row
        self.is_suspect = False  # was in a step that failed: runs alone until a step of its own succeeds
        self.finish_reason: str | None = None  # "stop" or "length"
        self.error: BaseException | None = None  # set when the request failed
        self.max_step_seqs = 0  # the most sequences in one step with this one

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        """The answer: generated tokens, without the EOS that ended it."""
        completion = self.token_ids[self.num_prompt_tokens:]
        if self.finish_reason == "stop" and completion and completion[-1] in self.eos_token_ids:
            return completion[:-1]
        return completion

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, max_model_len: int) -> None:
        """Add a sampled token; set `finish_reason` when it ends the answer (EOS, the grammar completed,
        `max_new_tokens`, or the model's context). A constrained sequence's matcher has already consumed
        the token (the runner feeds a whole step's tokens to their matchers at once)."""
        self.token_ids.append(token_id)
        if self.matcher is not None:
            if self.matcher.is_error():
                self.error = ValueError(f"the grammar rejected token {token_id}: {self.matcher.get_error()}")
                return
            if self.matcher.is_stopped():
                self.finish_reason = "stop"
                return
        if token_id in self.eos_token_ids:
            self.finish_reason = "stop"
        elif self.num_completion_tokens >= self.max_new_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
