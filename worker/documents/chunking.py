"""Splitting long documents to fit the model's input budget: pure functions, tested without a model.

A document is a sequence of parts (text pieces and page images) with token counts. `plan_chunks`
packs consecutive parts into chunks within a budget, each chunk starting with the last parts of the
previous one up to `overlap_tokens` (context across the cut). `split_text` first cuts text on
paragraph boundaries, then lines, then sentences, so that no piece exceeds the budget alone.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

_SPLITTERS = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"(?<=[.;:!?])\s+"))


def split_text(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """`text` cut into pieces of at most `max_tokens`, on the coarsest boundary that achieves it.

    Paragraphs are kept whole where they fit; a paragraph that does not is cut on lines, then
    sentences, then (last resort) into equal slices of characters.
    """
    return [piece for piece in _split(text.strip(), count_tokens, max_tokens, 0) if piece.strip()]


def _split(text: str, count_tokens: Callable[[str], int], max_tokens: int, level: int) -> list[str]:
    if count_tokens(text) <= max_tokens:
        return [text]
    if level == len(_SPLITTERS):
        half = len(text) // 2
        return _split(text[:half], count_tokens, max_tokens, level) + _split(text[half:], count_tokens, max_tokens, level)
    pieces = [p for p in _SPLITTERS[level].split(text) if p.strip()]
    if len(pieces) == 1:
        return _split(text, count_tokens, max_tokens, level + 1)
    return [out for piece in pieces for out in _split(piece, count_tokens, max_tokens, level + 1)]


def plan_chunks(token_counts: Sequence[int], budget: int, overlap_tokens: int = 0,
                can_overlap: Sequence[bool] | None = None) -> list[list[int]]:
    """Group part indices into chunks of consecutive parts whose tokens sum to at most `budget`.

    Each chunk after the first begins with the trailing parts of the previous chunk that fit in
    `overlap_tokens` (only parts allowed by `can_overlap`, e.g. text but not images). Every part is
    in at least one chunk, in order. A part larger than the budget raises ValueError: split it first.
    """
    if any(n > budget for n in token_counts):
        raise ValueError(f"a part of {max(token_counts)} tokens exceeds the chunk budget of {budget}")
    can_overlap = can_overlap or [True] * len(token_counts)
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, count in enumerate(token_counts):
        if current and used + count > budget:
            chunks.append(current)
            current, used = _overlap(current, token_counts, can_overlap, min(overlap_tokens, budget - count))
        current.append(index)
        used += count
    if current:
        chunks.append(current)
    return chunks


def _overlap(previous: list[int], token_counts: Sequence[int], can_overlap: Sequence[bool],
             room: int) -> tuple[list[int], int]:
    carried: list[int] = []
    used = 0
    for index in reversed(previous):
        if not can_overlap[index] or used + token_counts[index] > room:
            break
        carried.insert(0, index)
        used += token_counts[index]
    # Carrying the whole previous chunk would make no progress.
    return (carried, used) if len(carried) < len(previous) else ([], 0)
