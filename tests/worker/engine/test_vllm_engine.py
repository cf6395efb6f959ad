"""The vLLM engine behind docbatch's seam, on vLLM's CPU build and the packaged model, built by the product's own
builder: token-id prompts, answers under a JSON schema, requests that join while others run, the prefix cache,
cancel and abort, requests that can never fit, and an engine core that dies. The same adapter drives vLLM 0.26 on
the GPU machine (docs/BENCHMARKS.md). One engine serves the module; the tests run in file order, the last kills it."""
from __future__ import annotations

import json
import signal
import time
from concurrent.futures import CancelledError

import psutil
import pytest

from schemas.settings import Settings
from schemas.tasks import builtin_task
from worker.answers.prompts import build_text_prompt, validate_json
from worker.engine.builder import build_engine, uses_vllm
from worker.engine.request import GenerationOptions, ModelInput, RequestAborted, RequestTooLarge
from worker.engine.vllm_engine import VllmEngine
from worker.models.loading import load_model

pytestmark = pytest.mark.slow
GREEDY = GenerationOptions(repetition_penalty=1.1)
EXACT = GenerationOptions(repetition_penalty=1.1, ignore_eos=True)
ROWS = 4  # max_batch_size: vLLM holds 4 rows + 8, the rest wait in the adapter
PARTIES = json.dumps({"type": "object", "additionalProperties": False, "required": ["parties", "governing_law"],
                      "properties": {"parties": {"type": "array", "maxItems": 2,
                                                 "items": {"type": "string", "maxLength": 40}},
                                     "governing_law": {"type": ["string", "null"], "maxLength": 30}}})
CONTRACT = ("MASTER SERVICES AGREEMENT between Northwind Analytics Ltd (the Supplier) and Harbour Freight plc (the "
            "Customer), effective 1 March 2024 for 24 months. Fees of GBP 12,000 per month are payable within 30 "
            "days. This Agreement is governed by the laws of England and Wales. ") * 3


@pytest.fixture(scope="module")
def settings(small_model_dir) -> Settings:
    return Settings(model=str(small_model_dir), device="cpu", home=small_model_dir.parent, engine="vllm",
                    max_batch_size=ROWS)


@pytest.fixture(scope="module")
def loaded(settings):
    return load_model(settings, weights=False)


@pytest.fixture(scope="module")
def engine(settings, loaded) -> VllmEngine:
    engine = build_engine(settings, loaded)
    yield engine
    engine.stop()


def _prompt(loaded, text: str) -> ModelInput:
    render = builtin_task("summarize", Settings()).render
    return build_text_prompt(loaded.tokenizer, render, text, 2048).model_input


def test_the_worker_loads_the_tokenizer_and_vllm_the_weights(settings, loaded, engine):
    # Given DOCBATCH_ENGINE=vllm
    assert uses_vllm(settings)
    # Then the worker holds no transformers model (one copy of the weights: vLLM's), only the tokenizer
    assert loaded.model is None and loaded.tokenizer is not None and loaded.eos_token_ids
    # And the engine is vLLM, with a KV cache it sized
    assert isinstance(engine, VllmEngine) and engine.stats.kv_capacity_tokens > 0


def test_token_id_prompts_joining_while_others_run_all_get_their_answers(loaded, engine):
    # Given prompts of different lengths, submitted in two waves while the first is running
    prompts = [_prompt(loaded, CONTRACT[:cut]) for cut in (120, 400, 700, 250, 900, 60, 500, 330)]
    before = engine.stats.tokens_out
    first = [engine.submit(p, 24, EXACT) for p in prompts[:5]]
    time.sleep(0.5)
    second = [engine.submit(p, 24, EXACT) for p in prompts[5:]]
    # Then every answer has exactly its 24 tokens (EOS ignored), rows shared steps, and the figures add up
    completions = [f.result(timeout=300) for f in first + second]
    assert [len(c.token_ids) for c in completions] == [24] * 8
    assert max(c.batch_size for c in completions) == ROWS
    assert engine.stats.tokens_out - before == 8 * 24


def test_answers_under_a_json_schema_validate(loaded, engine):
    # Given contract prompts whose answers must match a schema
    prompts = [dataclass_replace(_prompt(loaded, CONTRACT[:cut]), PARTIES) for cut in (200, 500, 800)]
    # When they are decoded under it (vLLM's guidance backend: llguidance, as in the other engines)
    answers = [engine.submit(p, 120, GREEDY).result(timeout=300) for p in prompts]
    # Then every answer is JSON that validates, ended by the grammar, not cut by the token limit
    for completion in answers:
        text = loaded.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert validate_json(PARTIES, text, None)["parties"] is not None
        assert len(completion.token_ids) < 120


def dataclass_replace(model_input: ModelInput, schema: str) -> ModelInput:
    return ModelInput(model_input.token_ids, json_schema=schema)


def test_a_repeated_prompt_is_read_from_the_prefix_cache(loaded, engine):
    # Given a long prompt already answered once
    prompt = _prompt(loaded, CONTRACT)
    engine.submit(prompt, 4, GREEDY).result(timeout=300)
    hits = engine.stats.prefix_cache_hit_tokens
    # When it comes again
    engine.submit(prompt, 4, GREEDY).result(timeout=300)
    # Then most of its tokens come from the prefix cache (whole KV blocks of it)
    assert engine.stats.prefix_cache_hit_tokens - hits >= len(prompt.token_ids) // 2


def test_cancel_drops_what_waits_and_abort_takes_back_what_runs(loaded, engine):
    # Given more requests than vLLM is handed at once (4 rows + 8): the last ones wait in the adapter
    prompt = _prompt(loaded, CONTRACT[:300])
    futures = [engine.submit(prompt, 16, EXACT) for _ in range(engine.max_in_engine + 4)]
    before = engine.stats.tokens_out
    # When the waiting ones are cancelled and a running one is aborted
    waiting = futures[engine.max_in_engine:]
    assert all(f.cancel() for f in waiting)
    running = futures[0]
    engine.abort(running)
    # Then the cancelled ones never ran, the aborted one raises RequestAborted, and the others finish whole
    with pytest.raises(RequestAborted):
        running.result(timeout=300)
    for future in waiting:
        with pytest.raises(CancelledError):
            future.result()
    finished = [f.result(timeout=300) for f in futures[1:engine.max_in_engine]]
    assert [len(c.token_ids) for c in finished] == [16] * (engine.max_in_engine - 1)
    assert engine.stats.tokens_out - before == 16 * (engine.max_in_engine - 1)
    # And aborting a finished request does nothing
    engine.abort(futures[1])
    assert len(futures[1].result().token_ids) == 16


def test_a_request_that_can_never_fit_fails_alone_before_vllm(loaded, engine):
    # Given a prompt longer than the model's context, and an empty one
    too_long = engine.submit(ModelInput([5] * (engine.max_model_len + 1)), 8, GREEDY)
    empty = engine.submit(ModelInput([]), 8, GREEDY)
    fine = engine.submit(_prompt(loaded, "A short note."), 8, GREEDY)
    # Then each fails by itself with a clear error, and the request beside them is answered
    with pytest.raises(RequestTooLarge, match="context"):
        too_long.result(timeout=10)
    with pytest.raises(ValueError, match="at least one prompt token"):
        empty.result(timeout=10)
    assert fine.result(timeout=300).token_ids


def test_one_documents_tasks_run_one_behind_the_other(loaded, engine, monkeypatch):
    # Given what the adapter hands vLLM, in order, with the priority it gives (vLLM's scheduler orders by it)
    handed: list[tuple[str, int]] = []
    add_request = engine.llm.add_request

    def record(request_id, *args, **kwargs):
        handed.append((request_id, kwargs["priority"]))
        return add_request(request_id, *args, **kwargs)

    monkeypatch.setattr(engine.llm, "add_request", record)
    # And vLLM's share filled, so that what comes next waits in the adapter
    blockers = [engine.submit(_prompt(loaded, CONTRACT[:200]), 8, EXACT) for _ in range(engine.max_in_engine)]
    # When three documents' first tasks come, then two of them come again with a second task
    tasks = {name: builtin_task(name, Settings()).render for name in ("summarize", "extract")}
    texts = {doc: f"Contract {doc}. " + CONTRACT[:300] for doc in ("one", "two", "three")}

    def task(name: str, doc: str) -> ModelInput:
        model_input = build_text_prompt(loaded.tokenizer, tasks[name], texts[doc], 2048).model_input
        return ModelInput(model_input.token_ids, prefix_group=doc)

    order = [("summarize", "one"), ("summarize", "two"), ("summarize", "three"), ("extract", "one"),
             ("extract", "two")]
    futures = {job: engine.submit(task(*job), 8, EXACT) for job in order}
    for future in [*blockers, *futures.values()]:
        assert len(future.result(timeout=300).token_ids) == 8
    # Then each document's second task went to vLLM right behind its first, ahead of the third document, at its
    # first task's priority; documents keep their order of arrival
    ids = {future._docbatch_request.request_id: job for job, future in futures.items()}
    went = [(ids[request_id], priority) for request_id, priority in handed if request_id in ids]
    assert [job for job, _ in went] == [("summarize", "one"), ("extract", "one"), ("summarize", "two"),
                                        ("extract", "two"), ("summarize", "three")]
    priority = dict(went)
    assert priority["summarize", "one"] == priority["extract", "one"] < priority["summarize", "two"] \
        == priority["extract", "two"] < priority["summarize", "three"]


def test_when_the_engine_core_dies_the_engine_says_so_and_fails_what_waits(loaded, engine):
    # Given the engine's fatal-error handler (a worker process exits there, for its supervisor to restart it)
    fatal: list[BaseException] = []
    engine.on_fatal = lambda error: (fatal.append(error), engine._fail_all(error))
    core = [p for p in psutil.Process().children(recursive=True) if "EngineCore" in " ".join(p.cmdline() + [p.name()])]
    assert core, "vLLM's engine core process was not found"
    # When vLLM's engine core process is killed while a request waits on it
    pending = engine.submit(_prompt(loaded, CONTRACT), 200, EXACT)
    for process in core:
        process.send_signal(signal.SIGKILL)
    # Then the engine calls its fatal handler and the request fails instead of waiting forever
    with pytest.raises(RuntimeError, match="engine stopped"):
        pending.result(timeout=120)
    assert fatal
