"""A held job's answer in the worker, around the engine: an answer cut off twice fails with an exact message and
keeps the tokens it spent; `cancel` ends a job whose request the engine has not started, lets one being generated
finish, and with `now` stops that too.

The engine is the real static engine; its `generate` is a stand-in that writes what the test needs (an answer cut
off, a batch that runs until the test lets it end), since what is tested here is everything around the model. The
store (SQLite) and the tokenizer (the packaged model's) are real.
"""
from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PARTIES_TASK
from transformers import AutoTokenizer

from schemas.messages import CANCELLED, FINISHING
from schemas.sql.lifecycle import Holder
from schemas.states import JobState
from worker.answers.prompts import Prompt
from worker.engine.request import ModelInput
from worker.engine.static_engine import StaticEngine
from worker.service import runtime
from worker.service.middleware import fail_on_error
from worker.stages.answering import answer_and_finish
from worker.stages.prompting import Request

PREP = Holder("prepare@h", "prepare@h/1", 30)
CUT_OFF = '{"parties": ["' + "Acme Corporation of Delaware and its affiliates, " * 200


@pytest.fixture
def tokenizer(small_model_dir):
    return AutoTokenizer.from_pretrained(small_model_dir)


def _worker(settings, tokenizer, generate) -> runtime.Runtime:
    """This process as an infer worker, its engine the static engine over `generate`."""
    engine = StaticEngine(generate, max_batch_size=8, max_batch_tokens=100_000, max_wait_ms=0).start()
    rt = runtime.Runtime(settings, "test@host", engine=engine, tokenizer=tokenizer)
    rt.store.migrate()
    return rt


def _running_jobs(rt: runtime.Runtime, count: int) -> list:
    """`count` jobs of the parties task, claimed by `rt` as an infer task claims them."""
    store = rt.store
    store.put_task(PARTIES_TASK.hash, PARTIES_TASK.name, PARTIES_TASK.model_dump(mode="json"))
    items = []
    for i in range(count):
        data = f"contract {i}".encode()
        store.put_document(hashlib.sha256(data).hexdigest(), data, "text/plain")
        items.append((f"contract-{i}.txt", hashlib.sha256(data).hexdigest()))
    batch = store.create_batch(PARTIES_TASK.name, {"task": PARTIES_TASK.hash}, "m", items)
    jobs = []
    for job_id in batch.to_enqueue:
        store.claim(job_id, JobState.QUEUED, JobState.PREPARING, PREP)
        store.mark_ready(job_id, PREP)
        jobs.append(store.claim(job_id, JobState.READY, JobState.RUNNING, rt.holder, count_attempt=True))
        rt.held.add(job_id)
    return jobs


def _answer(rt: runtime.Runtime, job) -> None:
    """The infer task's body for a claimed job, as `worker.service.tasks.infer` runs it."""
    request = Request(PARTIES_TASK, Prompt(ModelInput([1, 2, 3]), is_truncated=False), PARTIES_TASK.generation,
                      PARTIES_TASK.schema_text)
    try:
        fail_on_error(rt, job, lambda: answer_and_finish(rt, job, request))
    finally:
        rt.held.discard(job.id)


def test_an_answer_cut_off_twice_fails_with_an_exact_message_and_keeps_the_tokens_it_spent(settings, tokenizer):
    # Given an engine whose every answer runs out of room inside a JSON string
    cut_off = tokenizer(CUT_OFF, add_special_tokens=False)["input_ids"]
    rt = _worker(settings, tokenizer, lambda inputs, max_new, options: [cut_off[:n] for n in max_new])
    try:
        (job,) = _running_jobs(rt, 1)
        # When the job is answered (max_new_tokens 128, then the repair at 256)
        _answer(rt, job)
    finally:
        rt.engine.stop()
    # Then it failed with schema_invalid, saying where it was cut off, the answer and every token spent kept
    failed = rt.store.get_job(job.id)
    assert (failed.state, failed.error_code) == (JobState.FAILED, "schema_invalid")
    assert failed.error_message == ("cut off at 256 tokens, twice max_new_tokens: the answer is not JSON: "
                                    "Unterminated string starting at character 13")
    assert (failed.tokens_in, failed.tokens_out) == (3, 128 + 256)
    assert rt.store.batch_rows(rt.store.latest_batch_ids()[0])[0][2].raw_text.startswith('{"parties": ["Acme')


class HeldGenerate:
    """A `generate` whose first batch runs until `release` is set; every answer is a short valid one."""

    def __init__(self, tokenizer) -> None:
        self.answer = tokenizer('{"parties": ["Acme"]}', add_special_tokens=False)["input_ids"]
        self.started, self.release, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, inputs, max_new, options):
        self.calls += 1
        self.started.set()
        self.release.wait(30)
        return [self.answer for _ in inputs]


@pytest.mark.parametrize("now", [False, True])
def test_cancel_ends_a_job_the_engine_has_not_started_and_lets_one_being_generated_finish(settings, tokenizer, now):
    # Given a worker whose engine generates one job's answer while a second job's request waits behind it
    generate = HeldGenerate(tokenizer)
    rt = _worker(settings, tokenizer, generate)
    generating, waiting = _running_jobs(rt, 2)
    with ThreadPoolExecutor(2) as tasks:
        first = tasks.submit(_answer, rt, generating)
        assert generate.started.wait(30)
        second = tasks.submit(_answer, rt, waiting)
        while rt.held._requests.get(waiting.id) is None:  # its task handed its request to the engine
            generate.started.wait(0.01)
        # When `cancel` (or `cancel --now`) tells the worker to stop both, and the generating batch ends
        outcomes = rt.stop_jobs({generating.id: now, waiting.id: now})
        # ... what it stopped is cancelled in the store before it answers (a second cancel finds it ended)
        stopped_at_once = {job_id: rt.store.get_job(job_id).state for job_id in (generating.id, waiting.id)}
        generate.release.set()
        first.result(timeout=30), second.result(timeout=30)
    rt.engine.stop()
    # Then the waiting job is cancelled without ever reaching the model; the generating one finishes (or, --now,
    # is cancelled too); no lease is left held
    assert outcomes == {waiting.id: CANCELLED, generating.id: CANCELLED if now else FINISHING}
    assert stopped_at_once == {waiting.id: JobState.CANCELLED,
                               generating.id: JobState.CANCELLED if now else JobState.RUNNING}
    jobs = {job_id: rt.store.get_job(job_id) for job_id in (generating.id, waiting.id)}
    assert jobs[waiting.id].state == JobState.CANCELLED
    assert jobs[waiting.id].error_message == "cancelled before the engine started it"
    assert jobs[generating.id].state == (JobState.CANCELLED if now else JobState.DONE)
    assert all(job.lease_owner is None for job in jobs.values()) and generate.calls == 1
    # ... and a stop for a job this worker does not hold is not its business
    assert rt.stop_jobs({"0" * 32: True}) == {}
