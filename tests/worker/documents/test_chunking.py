"""Chunk planning for long documents: pure functions, checked without a model."""
import pytest

from worker.documents.chunking import plan_chunks, split_text


def words(text: str) -> int:
    return len(text.split())


def test_paragraphs_are_kept_whole_when_they_fit():
    text = "one two three\n\nfour five\n\nsix seven eight nine"
    assert split_text(text, words, max_tokens=4) == ["one two three", "four five", "six seven eight nine"]


def test_a_paragraph_too_long_is_cut_on_lines_then_sentences():
    text = "a b c. d e f. g h i.\nj k l"
    assert split_text(text, words, max_tokens=3) == ["a b c.", "d e f.", "g h i.", "j k l"]
    assert all(words(piece) <= 7 for piece in split_text("x " * 50, words, max_tokens=7))


def test_chunks_stay_within_budget_cover_every_part_in_order_and_overlap():
    counts = [30, 40, 20, 50, 10, 60, 25]
    chunks = plan_chunks(counts, budget=100, overlap_tokens=25)
    assert all(sum(counts[i] for i in chunk) <= 100 for chunk in chunks)
    seen = [i for chunk in chunks for i in chunk]
    assert sorted(set(seen)) == list(range(len(counts)))
    assert seen == sorted(seen)  # order kept, overlapping parts repeated in place
    overlaps = [set(a) & set(b) for a, b in zip(chunks, chunks[1:])]
    assert any(overlaps) and all(sum(counts[i] for i in o) <= 25 for o in overlaps)


def test_no_overlap_for_parts_that_may_not_repeat():
    chunks = plan_chunks([50, 50, 50], budget=100, overlap_tokens=60, can_overlap=[False, False, False])
    assert chunks == [[0, 1], [2]]


def test_a_part_over_the_budget_must_be_split_first():
    with pytest.raises(ValueError, match="exceeds the chunk budget"):
        plan_chunks([10, 200], budget=100)
