"""Block accounting and prefix sharing, without a model: pure bookkeeping."""
from __future__ import annotations

import pytest

from worker.engine.paged.block_manager import NULL_BLOCK, BlockManager
from worker.engine.paged.sequence import Sequence


def _seq(tokens, max_new=4):
    return Sequence(list(tokens), max_new)


def test_allocation_takes_whole_blocks_and_freeing_returns_them():
    blocks = BlockManager(num_blocks=9, block_size=4)
    seq = _seq(range(10))
    # When 10 tokens are allocated, then one more
    assert blocks.allocate(seq, 10)
    assert len(seq.block_table) == 3 and blocks.num_free_blocks == 5
    seq.num_computed_tokens = 10
    assert blocks.allocate(seq, 1) and len(seq.block_table) == 3  # the 11th token fits in block 3
    seq.num_computed_tokens = 12
    assert blocks.allocate(seq, 1) and len(seq.block_table) == 4
    # Then freeing gives every block back, and the null block is never handed out
    assert NULL_BLOCK not in seq.block_table
    blocks.free(seq)
    assert blocks.num_free_blocks == blocks.num_usable_blocks == 8 and seq.block_table == []


def test_allocation_fails_without_changing_anything_when_blocks_run_out():
    blocks = BlockManager(num_blocks=4, block_size=4)
    first, second = _seq(range(8)), _seq(range(100, 108))
    assert blocks.allocate(first, 8)
    assert not blocks.allocate(second, 8)
    assert second.block_table == [] and blocks.num_free_blocks == 1


def test_a_computed_prefix_is_shared_and_the_last_token_is_always_computed():
    blocks = BlockManager(num_blocks=16, block_size=4)
    shared = list(range(12))
    first = _seq(shared + [50, 51])
    assert blocks.match_prefix(first) == 0
    blocks.allocate(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    blocks.cache_computed(first)  # 3 full blocks registered
    # When a second sequence starts with the same 12 tokens
    second = _seq(shared + [60, 61, 62])
    assert blocks.match_prefix(second) == 12
    assert second.block_table == first.block_table[:3]
    # Then a sequence that is exactly the cached prefix still computes its last block (its last token's logits)
    third = _seq(shared)
    assert blocks.match_prefix(third) == 8
    # And shared blocks are freed only when their last user lets go
    used = blocks.num_used_blocks
    blocks.free(first)
    assert blocks.num_used_blocks == used - 1  # only first's own last block
    blocks.free(second)
    blocks.free(third)
    assert blocks.num_used_blocks == 0


def test_freed_prefix_blocks_stay_cached_until_they_are_needed_again():
    blocks = BlockManager(num_blocks=5, block_size=2)
    first = _seq([1, 2, 3, 4, 5])
    blocks.allocate(first, 5)
    first.num_computed_tokens = 5
    blocks.cache_computed(first)
    blocks.free(first)
    # A later sequence with the same start still finds them
    again = _seq([1, 2, 3, 4, 9])
    assert blocks.match_prefix(again) == 4
    blocks.free(again)
    # But allocating everything evicts them, and then nothing matches
    filler = _seq(range(100, 108))
    assert blocks.allocate(filler, 8)
    blocks.free(filler)
    assert blocks.match_prefix(_seq([1, 2, 3, 4, 9])) == 0


def test_a_prefix_match_needs_the_same_tokens_from_the_start():
    blocks = BlockManager(num_blocks=8, block_size=2)
    first = _seq([1, 2, 3, 4, 5])
    blocks.allocate(first, 5)
    first.num_computed_tokens = 5
    blocks.cache_computed(first)
    # Same second block, different first block: the chained hash does not match
    assert blocks.match_prefix(_seq([9, 9, 3, 4, 5])) == 0


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=1, block_size=16)
