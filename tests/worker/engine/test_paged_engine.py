"""The paged engine on the real small model (CPU): its answers are `generate`'s, whatever joins, waits,
is preempted or shares its steps, and it gives back every block it takes."""
from __future__ import annotations

import importlib.resources
import json
import threading
import time

import pytest

from schemas.settings import Settings
from schemas.tasks import builtin_task
from worker.engine.request import GenerationOptions, ModelInput, RequestAborted, RequestTooLarge
from worker.engine.builder import build_engine
from worker.engine.paged.engine import PagedEngine
from worker.engine.hf_generator import HFGenerator
from worker.documents.extract import extract_pages
from worker.models.loading import load_model
from worker.answers.prompts import build_text_prompt, validate_json

pytestmark = pytest.mark.slow
SAMPLES = importlib.resources.files("producer") / "samples"
GREEDY = GenerationOptions(repetition_penalty=1.1)  # the product's default decoding
NEW_TOKENS = 16
KEY_TERMS = json.dumps({"type": "object", "additionalProperties": False, "required": ["parties", "governing_law"],
                        "properties": {"parties": {"type": "array", "maxItems": 3,
                                                   "items": {"type": "string", "maxLength": 40}},
                                       "governing_law": {"type": ["string", "null"], "maxLength": 40}}})
TERM_DATES = json.dumps({"type": "object", "additionalProperties": False, "required": ["effective_date", "term_months"],
                         "properties": {"effective_date": {"type": "string", "maxLength": 20},
                                        "term_months": {"type": ["integer", "null"], "minimum": 0, "maximum": 600}}})
CONSTRAINED_TOKENS = 200


def _engine(small_model_dir, **overrides) -> PagedEngine:
    settings = Settings(model=str(small_model_dir), device="cpu", home=small_model_dir.parent, engine="paged",
                        dtype="float32", **overrides)
    return build_engine(settings, load_model(settings))


@pytest.fixture(scope="module")
def engine(small_model_dir):
    # A small step budget, so long prompts are computed in chunks beside running decodes.
    engine = _engine(small_model_dir, max_step_tokens=96, max_batch_size=32)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def prompts(small_model) -> list[ModelInput]:
    """16 prompts of 5 to 450 tokens: contract excerpts under the summarize task's prompt (one shared
    instruction), and a few bare questions."""
    tokenizer = small_model.tokenizer
    render = builtin_task("summarize", Settings()).render
    texts = ["\n\n".join(p.text for p in extract_pages(path.read_bytes()))
             for path in sorted((SAMPLES / "contracts").iterdir())]
    cuts = [200, 900, 400, 1500, 90, 1200, 600, 1800, 300, 1000, 700, 150]
    prompts = [build_text_prompt(tokenizer, render, texts[i % len(texts)][:cut], 4096).model_input
               for i, cut in enumerate(cuts)]
    questions = ["The capital of France is", "Write one word:", "A contract is an agreement between",
                 "List three colours:"]
    prompts += [ModelInput(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]
    return prompts


@pytest.fixture(scope="module")
def reference(small_model, prompts) -> list[list[int]]:
    """transformers' `generate`, one prompt at a time."""
    generator = HFGenerator(small_model.model, small_model.tokenizer, small_model.eos_token_ids)
    return [generator([p], [NEW_TOKENS], GREEDY)[0] for p in prompts]


def _answers(futures) -> list[list[int]]:
    return [f.result(timeout=600).token_ids for f in futures]


def test_greedy_answers_are_generates_own_while_requests_join_and_leave(engine, prompts, reference):
    # Given half the prompts already decoding
    first = [engine.submit(p, NEW_TOKENS, GREEDY) for p in prompts[:8]]
    while engine.stats.tokens_out < 8:
        time.sleep(0.01)
    # When the other half joins from other threads
    later: list = [None] * (len(prompts) - 8)

    def submit(i: int) -> None:
        later[i] = engine.submit(prompts[8 + i], NEW_TOKENS, GREEDY)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(later))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then every answer is token for token what generate gives that prompt alone
    assert _answers(first + later) == reference
    assert all(len(answer) > 0 for answer in reference)
    # and steps mixed prompt chunks with decodes, many requests at a time
    assert max(f.result().batch_size for f in first + later) > 8


def test_the_shared_instruction_is_computed_once_and_reused(engine, prompts, reference):
    hits_before = engine.stats.prefix_cache_hit_tokens
    futures = [engine.submit(p, NEW_TOKENS, GREEDY) for p in prompts[:6]]
    assert _answers(futures) == reference[:6]
    # Each of the 6 found at least the chat template and the task's instruction in the cache
    assert engine.stats.prefix_cache_hit_tokens - hits_before >= 6 * 16


def test_a_preempted_request_resumes_with_the_same_tokens(small_model_dir, prompts, reference):
    # Given a KV cache of 40 blocks (640 tokens), far too small for these prompts at once
    block_bytes = 2 * 30 * 16 * 3 * 64 * 4  # k and v, 30 layers, 16 tokens, 3 heads of 64, float32
    engine = _engine(small_model_dir, kv_cache_gb=40 * block_bytes / 2**30, max_step_tokens=256)
    chosen = [0, 2, 4, 6, 8, 12, 13]
    try:
        futures = [engine.submit(prompts[i], NEW_TOKENS, GREEDY) for i in chosen]
        answers = _answers(futures)
        stats = engine.stats
    finally:
        engine.stop()
    assert stats.num_preemptions > 0
    assert answers == [reference[i] for i in chosen]
    assert stats.kv_blocks_used == 0


def test_a_request_not_started_is_cancelled_at_once_and_an_aborted_one_gives_its_blocks_back(
        small_model_dir, prompts, reference):
    # Given an engine of two rows, both decoding long answers, and three requests waiting behind them
    engine = _engine(small_model_dir, max_batch_size=2)
    scheduler, long_answers = engine.scheduler, GenerationOptions(repetition_penalty=1.1, ignore_eos=True)
    try:
        running = [engine.submit(prompts[i], 128, long_answers) for i in (12, 13)]
        waiting = [engine.submit(prompts[i], NEW_TOKENS, GREEDY) for i in (0, 1, 2)]
        while not all(f.running() for f in running):
            time.sleep(0.01)
        # When one waiting request is cancelled and another aborted
        assert waiting[0].cancel()
        engine.abort(waiting[1])
        # Then both leave the engine's queue at the next step, long before their turn
        while len(scheduler.waiting) != 1:
            time.sleep(0.01)
        assert not any(f.done() for f in running)
        # When a running request is aborted (twice: idempotent)
        assert not running[0].cancel()  # started: only abort stops it
        engine.abort(running[0])
        engine.abort(running[0])
        # Then its caller is let go at once, the waiting one takes its row, and the others get their own answers
        with pytest.raises(RequestAborted):
            running[0].result(timeout=1)
        with pytest.raises(RequestAborted):
            waiting[1].result(timeout=1)
        assert waiting[2].result(timeout=600).token_ids == reference[2]
        finished = running[1].result(timeout=600)
        engine.abort(running[1])  # finished: left alone
        assert running[1].result() is finished and len(finished.token_ids) == 128
    finally:
        engine.stop()
    assert waiting[0].cancelled()
    # ... and every block and row is given back
    assert scheduler.blocks.num_used_blocks == 0 and not scheduler.running and not scheduler.waiting
    assert len(scheduler._free_rows) == scheduler.max_num_seqs


def test_no_block_is_leaked_after_many_requests(engine, small_model):
    # Given 120 short requests: greedy, sampled, constrained and free, some ending at EOS
    tokenizer = small_model.tokenizer
    options = [GREEDY, GenerationOptions(temperature=0.9, top_p=0.8), GenerationOptions()]
    futures = []
    for i in range(120):
        text = f"Request {i}: " + "say something about contracts " * (i % 5)
        schema = KEY_TERMS if i % 20 == 0 else None
        model_input = ModelInput(tokenizer(text, add_special_tokens=False)["input_ids"], json_schema=schema)
        futures.append(engine.submit(model_input, 48 if schema else 1 + i % 4, options[i % 3]))
    # When they all complete
    answers = [f.result(timeout=600) for f in futures]
    # Then every block is free again (prefix-cached ones included in the free list) and no row is held
    assert len(answers) == 120
    scheduler = engine.scheduler
    assert scheduler.blocks.num_used_blocks == 0 and not scheduler.running and not scheduler.waiting
    assert len(scheduler._free_rows) == scheduler.max_num_seqs


def test_constrained_rows_of_different_schemas_and_free_rows_share_steps(engine, prompts, small_model):
    # Two small schemas, so that every answer ends well within its budget (the built-in tasks' long schemas
    # run on this engine in the pipeline tests, where each answer is validated)
    tokenizer = small_model.tokenizer
    inputs = [ModelInput(prompts[4].token_ids, json_schema=TERM_DATES),
              ModelInput(prompts[8].token_ids, json_schema=TERM_DATES),
              ModelInput(prompts[0].token_ids, json_schema=KEY_TERMS),
              ModelInput(prompts[11].token_ids, json_schema=KEY_TERMS),
              prompts[12], prompts[13]]
    futures = [engine.submit(i, CONSTRAINED_TOKENS, GREEDY) for i in inputs]
    completions = [f.result(timeout=600) for f in futures]
    texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    for text in texts[:2]:
        assert set(validate_json(TERM_DATES, text)) == {"effective_date", "term_months"}
    for text in texts[2:4]:
        assert set(validate_json(KEY_TERMS, text)) == {"parties", "governing_law"}
    assert all(len(c.token_ids) < CONSTRAINED_TOKENS for c in completions[:4])  # each closed its JSON itself
    assert all(c.batch_size >= 6 for c in completions)  # all six were in one step at least once


def test_rows_with_different_sampling_settings_share_a_step(engine, prompts, small_model):
    plain = GenerationOptions()  # greedy, no penalty
    sampled = GenerationOptions(temperature=0.8, top_p=0.9, repetition_penalty=1.3)
    settings = [GREEDY, plain, sampled, GREEDY]
    futures = [engine.submit(prompts[12 + i], NEW_TOKENS, option) for i, option in enumerate(settings)]
    completions = [f.result(timeout=600) for f in futures]
    generator = HFGenerator(small_model.model, small_model.tokenizer, small_model.eos_token_ids)
    assert completions[0].token_ids == generator([prompts[12]], [NEW_TOKENS], GREEDY)[0]
    assert completions[1].token_ids == generator([prompts[13]], [NEW_TOKENS], plain)[0]
    assert completions[3].token_ids == generator([prompts[15]], [NEW_TOKENS], GREEDY)[0]
    assert 0 < len(completions[2].token_ids) <= NEW_TOKENS
    assert all(c.batch_size == 4 for c in completions)


def test_a_request_that_breaks_the_model_fails_alone(engine, prompts, reference):
    # The model cannot be broken on purpose here, so its runner is wrapped to raise for one poison token:
    # the engine's recovery (quarantine, each request alone) is the real one.
    poison = 49151
    runner = engine.runner
    real_run = runner.run

    def run(step):
        if any(poison in seq.token_ids for seq in step.seqs):
            raise RuntimeError("this prompt breaks the model (injected)")
        return real_run(step)

    runner.run = run
    try:
        futures = [engine.submit(p, NEW_TOKENS, GREEDY) for p in prompts[:4]]
        bad = engine.submit(ModelInput([1, 2, poison]), NEW_TOKENS, GREEDY)
        with pytest.raises(RuntimeError, match="injected"):
            bad.result(timeout=600)
        assert _answers(futures) == reference[:4]
    finally:
        runner.run = real_run


def test_requests_that_can_never_run_fail_at_once(engine, small_model_dir):
    with pytest.raises(RequestTooLarge):
        engine.submit(ModelInput([1] * 9000), 8).result(timeout=10)  # longer than the model's context
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(ModelInput([10**7]), 8).result(timeout=10)
    with pytest.raises(ValueError, match="cannot compile"):
        engine.submit(ModelInput([1, 2], json_schema='{"type": "no-such-type"}'), 8).result(timeout=10)
