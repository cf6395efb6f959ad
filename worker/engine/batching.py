"""Batch planning: a pure function, so it is tested without a model or a GPU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class PlanItem:
    """What the planner needs to know of one request."""

    prompt_tokens: int
    max_new_tokens: int


def padded_cost(prompt_tokens: Sequence[int], max_new_tokens: Sequence[int]) -> int:
    """Token slots one left-padded batch occupies: rows x (longest prompt + most new tokens)."""
    return len(prompt_tokens) * (max(prompt_tokens) + max(max_new_tokens)) if prompt_tokens else 0


def plan_batches(items: Sequence[PlanItem], max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Split `items` into batches, returned as lists of indices into `items`.

    Items are sorted by prompt length so each batch wastes little padding, then packed greedily while the
    batch holds at most `max_batch_size` rows and its padded cost stays within `max_batch_tokens`. An item
    that alone exceeds the budget still gets a batch of its own (the engine splits further on OOM). Every
    item appears in exactly one batch, so nothing waits beyond the current step.
    """
    if max_batch_size < 1 or max_batch_tokens < 1:
        raise ValueError("max_batch_size and max_batch_tokens must be positive")
    order = sorted(range(len(items)), key=lambda i: (items[i].prompt_tokens, i))
    batches: list[list[int]] = []
    current: list[int] = []
    most_new = 0
    for i in order:
        item = items[i]
        # Sorted ascending, so the new item is the longest prompt of the batch it joins.
        cost = (len(current) + 1) * (item.prompt_tokens + max(most_new, item.max_new_tokens))
        if current and (len(current) == max_batch_size or cost > max_batch_tokens):
            batches.append(current)
            current, most_new = [], 0
        current.append(i)
        most_new = max(most_new, item.max_new_tokens)
    if current:
        batches.append(current)
    return batches
