"""The batch plan is a pure function: every request lands in exactly one batch within the caps."""
import pytest

from worker.engine.batching import PlanItem, padded_cost, plan_batches


def test_every_item_is_planned_once_and_batches_respect_both_caps():
    # Given prompts of many lengths
    items = [PlanItem(prompt_tokens=n, max_new_tokens=32) for n in (5, 300, 40, 41, 7, 900, 39, 6, 250, 8)]
    # When planned with a size cap of 3 and a token budget of 1,500
    batches = plan_batches(items, max_batch_size=3, max_batch_tokens=1500)
    # Then each item appears once, and each batch keeps both caps (a lone oversize item may not)
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    for batch in batches:
        assert len(batch) <= 3
        cost = padded_cost([items[i].prompt_tokens for i in batch], [items[i].max_new_tokens for i in batch])
        assert cost <= 1500 or len(batch) == 1


def test_similar_lengths_are_grouped_to_save_padding():
    items = [PlanItem(n, 10) for n in (100, 5, 101, 6, 102, 7)]
    batches = plan_batches(items, max_batch_size=3, max_batch_tokens=10_000)
    assert [sorted(items[i].prompt_tokens for i in b) for b in batches] == [[5, 6, 7], [100, 101, 102]]


def test_an_item_over_the_budget_gets_a_batch_of_its_own():
    items = [PlanItem(10, 10), PlanItem(5000, 10), PlanItem(12, 10)]
    batches = plan_batches(items, max_batch_size=8, max_batch_tokens=1000)
    assert [1] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2]


def test_the_token_budget_counts_the_largest_max_new_tokens():
    # Two 10-token prompts: one wants 10 new tokens, the other 500, so together they cost 2 x 510.
    items = [PlanItem(10, 10), PlanItem(10, 500)]
    assert plan_batches(items, max_batch_size=8, max_batch_tokens=1000) == [[0], [1]]
    assert plan_batches(items, max_batch_size=8, max_batch_tokens=1020) == [[0, 1]]


def test_empty_input_and_bad_caps():
    assert plan_batches([], max_batch_size=4, max_batch_tokens=100) == []
    with pytest.raises(ValueError):
        plan_batches([PlanItem(1, 1)], max_batch_size=0, max_batch_tokens=100)
