"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix sharing by hash.

Pure Python, no tensors: the scheduler plans with it and the tests check it without a model.

A full block whose keys and values have been computed is registered under a hash chained over every
token up to its end, so a later sequence that starts with the same tokens (the chat template, a task's
instructions) reuses it instead of computing it again. Freed blocks keep their hash while they sit in
the free list, least recently used first, and lose it only when they are handed out again.
"""
from __future__ import annotations

from collections import OrderedDict

from worker.engine.paged.sequence import Sequence

NULL_BLOCK = 0  # never handed out: padding rows of a CUDA-graph step write their keys and values here


def _chain(parent: int | None, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"need at least 2 blocks of at least 1 token, got {num_blocks} of {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._refs = [0] * num_blocks
        self._hashes: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self._cached: dict[int, int] = {}  # hash -> block holding those computed tokens

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks `seq` needs to hold `num_new_tokens` more computed tokens."""
        return max(0, self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks the cached blocks of its longest computed prefix; returns
        the tokens reused. The last token is never reused: its logits must be computed."""
        if seq.block_table:
            raise ValueError(f"{seq} already holds blocks")
        parent = None
        for index in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
            parent = _chain(parent, tokens)
            block = self._cached.get(parent)
            if block is None or self._tokens[block] != tokens:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            seq.block_table.append(block)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Add the blocks `seq` needs for `num_new_tokens` more tokens; False (and nothing changed) when
        too few are free."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take())
        return True

    def cache_computed(self, seq: Sequence) -> None:
        """Register the full blocks of `seq` whose keys and values are now computed, for sharing."""
        size = self.block_size
        for index in range(len(seq.block_hashes), seq.num_computed_tokens // size):
            tokens = tuple(seq.token_ids[index * size:(index + 1) * size])
            digest = _chain(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(digest)
            block = seq.block_table[index]
            if self._hashes[block] is None and digest not in self._cached:
                self._hashes[block], self._tokens[block] = digest, tokens
                self._cached[digest] = block

    def free(self, seq: Sequence) -> None:
        """Release the blocks of `seq` (finished or preempted). Its tail goes first into the free list, so
        shared prefixes, freed last, stay cached longest."""
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hashes[block] is None:  # nothing to keep: hand it out first
                    self._free.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0

    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        digest = self._hashes[block]
        if digest is not None:  # evict its cached content
            if self._cached.get(digest) == block:
                del self._cached[digest]
            self._hashes[block] = self._tokens[block] = None
        self._refs[block] = 1
        return block
