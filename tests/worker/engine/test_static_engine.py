"""The static (hf) engine batches requests from many threads, splits a batch on OOM, and isolates a bad request.

The OOM is injected: this machine has no GPU, so a generator raises torch's real CUDA OOM error
type for batches above a size; everything else (threads, futures, planning) is the real engine.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from worker.engine.request import GenerationOptions, ModelInput, RequestAborted, RequestTooLarge
from worker.engine.hf_generator import HFGenerator
from worker.engine.static_engine import StaticEngine


class EchoGenerator:
    """Returns each prompt's last token repeated max_new times; records each call's batch size."""

    def __init__(self, max_rows_that_fit: int = 10**9, poison: int | None = None) -> None:
        self.calls: list[int] = []
        self.max_rows_that_fit = max_rows_that_fit
        self.poison = poison
        self.lock = threading.Lock()

    def __call__(self, inputs, max_new_tokens, options):
        prompts = [i.token_ids for i in inputs]
        if len(prompts) > self.max_rows_that_fit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        if self.poison is not None and any(p[-1] == self.poison for p in prompts):
            raise ValueError("this prompt breaks the model (injected)")
        with self.lock:
            self.calls.append(len(prompts))
        return [[p[-1]] * n for p, n in zip(prompts, max_new_tokens)]


def _submit_concurrently(engine: StaticEngine, prompts: list[list[int]], max_new: int = 3):
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = list(pool.map(lambda p: engine.submit(ModelInput(p), max_new), prompts))
    return futures


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer():
    generator = EchoGenerator()
    engine = StaticEngine(generator, max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=200).start()
    try:
        futures = _submit_concurrently(engine, [[1, 2, i] for i in range(20)])
        completions = [f.result(timeout=10) for f in futures]
    finally:
        engine.stop()
    assert [c.token_ids for c in completions] == [[i] * 3 for i in range(20)]
    assert len(generator.calls) < 20 and max(generator.calls) <= 8
    assert sum(generator.calls) == 20


def test_requests_with_different_decoding_options_never_share_a_batch():
    seen: list[float] = []

    def generator(prompts, max_new_tokens, options):
        seen.append(options.repetition_penalty)
        return [[0]] * len(prompts)

    engine = StaticEngine(generator, max_batch_size=16, max_batch_tokens=10_000, max_wait_ms=300).start()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = list(pool.map(lambda i: engine.submit(ModelInput([i]), 1, GenerationOptions(1.0 + i % 2)), range(8)))
        sizes = [f.result(timeout=10).batch_size for f in futures]
    finally:
        engine.stop()
    assert sorted(set(seen)) == [1.0, 2.0]
    assert max(sizes) <= 4  # each batch holds only the 4 requests of its own option


def test_out_of_memory_splits_the_batch_until_it_fits():
    generator = EchoGenerator(max_rows_that_fit=2)
    engine = StaticEngine(generator, max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=200).start()
    try:
        futures = _submit_concurrently(engine, [[i] for i in range(8)])
        completions = [f.result(timeout=10) for f in futures]
    finally:
        engine.stop()
    assert [c.token_ids for c in completions] == [[i] * 3 for i in range(8)]
    assert all(c.batch_size <= 2 for c in completions)
    assert engine.stats.num_oom_splits >= 1


def test_a_request_that_never_fits_fails_alone_with_request_too_large():
    generator = EchoGenerator(max_rows_that_fit=0)
    engine = StaticEngine(generator, max_batch_size=4, max_batch_tokens=10_000, max_wait_ms=10).start()
    try:
        with pytest.raises(RequestTooLarge):
            engine.submit(ModelInput([1, 2]), 3).result(timeout=10)
    finally:
        engine.stop()


def test_one_bad_request_does_not_sink_the_others():
    generator = EchoGenerator(poison=666)
    engine = StaticEngine(generator, max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=200).start()
    try:
        futures = _submit_concurrently(engine, [[1], [2], [666], [4], [5]])
        outcomes = [f.exception(timeout=10) or f.result() for f in futures]
    finally:
        engine.stop()
    assert isinstance(outcomes[2], ValueError)
    assert [o.token_ids for i, o in enumerate(outcomes) if i != 2] == [[1] * 3, [2] * 3, [4] * 3, [5] * 3]


class HeldGenerator(EchoGenerator):
    """An EchoGenerator whose calls wait until `release` is set: a batch that runs as long as the test wants."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()
        self.prompts: list[list[int]] = []

    def __call__(self, inputs, max_new_tokens, options):
        self.prompts += [i.token_ids for i in inputs]
        self.started.set()
        self.release.wait(10)
        return super().__call__(inputs, max_new_tokens, options)


def test_cancelled_and_aborted_requests_are_never_computed_and_a_running_one_is_let_go_at_once():
    # Given a batch that runs (its generate call held) and three requests waiting behind it
    generator = HeldGenerator()
    engine = StaticEngine(generator, max_batch_size=8, max_batch_tokens=10_000, max_wait_ms=0).start()
    try:
        running = engine.submit(ModelInput([1]), 2)
        assert generator.started.wait(10)
        cancelled, aborted, kept = (engine.submit(ModelInput([i]), 2) for i in (2, 3, 4))
        # When one waiting request is cancelled, one aborted, and the running one aborted (twice: idempotent)
        assert cancelled.cancel()
        engine.abort(aborted)
        assert not running.cancel()  # started: only abort stops it
        engine.abort(running)
        engine.abort(running)
        # Then the running one's caller is let go at once, before its batch ends
        with pytest.raises(RequestAborted):
            running.result(timeout=1)
        generator.release.set()
        # ... the kept request is answered, a finished request is left alone by abort, and the engine goes on
        assert kept.result(timeout=10).token_ids == [4, 4]
        engine.abort(kept)
        assert kept.result().token_ids == [4, 4]
        assert engine.submit(ModelInput([5]), 1).result(timeout=10).token_ids == [5]
    finally:
        generator.release.set()
        engine.stop()
    # ... and neither the cancelled nor the aborted waiting request reached the model
    assert cancelled.cancelled()
    with pytest.raises(RequestAborted):
        aborted.result(timeout=1)
    assert generator.prompts == [[1], [4], [5]]


@pytest.mark.slow
def test_batched_generation_matches_one_at_a_time_on_the_real_small_model(small_model):
    # Given prompts of different lengths, so left padding is exercised
    tokenizer = small_model.tokenizer
    texts = ["The capital of France is", "Write one word:", "A contract is an agreement between two or more"]
    prompts = [ModelInput(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    generator = HFGenerator(small_model.model, tokenizer, small_model.eos_token_ids)
    # When generated together and alone (greedy)
    together = generator(prompts, [8] * 3)
    alone = [generator([p], [8])[0] for p in prompts]
    # Then the padded batch gives every row the tokens it gets alone
    assert together == alone
    assert all(len(row) > 0 for row in together)
