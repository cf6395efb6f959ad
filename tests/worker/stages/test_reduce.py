"""The reduce of a long document's chunk answers in the worker: merged without the model when the parts
agree, handed to the model with only the conflicts when they do not (real store, real Redis)."""
from __future__ import annotations

import hashlib

import pytest
import redis

from schemas.sql.lifecycle import Holder
from schemas.messages import make_celery
from schemas.outputs import FinancialReport
from schemas.states import JobState
from schemas.sql.store import Store
from schemas.tasks import builtin_task
from worker.service import runtime
from worker.stages.reducing import advance_parent

EMPTY = FinancialReport.model_validate({field: None for field in FinancialReport.model_fields} | {"segments": []})


def _answer(**fields) -> dict:
    return FinancialReport.model_validate(EMPTY.model_dump() | fields).model_dump(mode="json")


@pytest.fixture
def worker_runtime(worker_settings):
    """This process as a worker would set it up for tasks (no model loaded: a reduce does not generate)."""
    rt = runtime.Runtime(worker_settings, "test@host", app=make_celery(worker_settings))
    rt.store.migrate()
    yield rt
    rt.store.close()

PREP, GPU0 = Holder("prepare@h", "prepare@h/1", 30), Holder("gpu0@h", "gpu0@h/1", 30)


def _parent_with_chunk_answers(store: Store, settings, answers: list[dict]) -> str:
    task = builtin_task("extract", settings)
    store.put_task(task.hash, task.name, task.model_dump(mode="json"))
    data = b"a long report"
    sha = hashlib.sha256(data).hexdigest()
    store.put_document(sha, data, "text/plain")
    parent_id = store.create_batch(task.name, {"task": task.hash}, "m", [("report.txt", sha)]).to_enqueue[0]
    store.claim(parent_id, JobState.QUEUED, JobState.PREPARING, PREP)
    chunk_ids, _ = store.create_chunks(parent_id, 1, [[{"text": f"part {i}"}] for i in range(len(answers))], PREP)
    for chunk_id, answer in zip(chunk_ids, answers):
        store.claim(chunk_id, JobState.READY, JobState.RUNNING, GPU0, count_attempt=True)
        store.finish(chunk_id, {"json": answer}, "{}", tokens_in=10, tokens_out=5, batch_size=2, holder=GPU0)
        store.chunk_finished(parent_id)
    return parent_id


def test_parts_that_agree_are_merged_into_the_answer_without_the_model(worker_runtime, worker_settings):
    # Given three chunk answers that complement each other (and agree where they overlap)
    store = worker_runtime.store
    parent_id = _parent_with_chunk_answers(store, worker_settings, [
        _answer(company="Acme plc", revenue=1200.0, segments=[{"name": "Cloud", "revenue": 700.0}]),
        _answer(company="Acme plc", total_assets=5000.0, total_liabilities=3000.0, equity=1000.0),
        _answer(net_income=150, segments=[{"name": "cloud", "revenue": 700}, {"name": "Retail", "revenue": 500}])])
    # When the last chunk's worker moves the document on
    advance_parent(worker_runtime, parent_id, 1)
    # Then the document is done with the merged answer, checked, and no generate call was made
    parent = store.get_job(parent_id)
    assert (parent.state, parent.batch_size, parent.tokens_out) == (JobState.DONE, None, None)
    ((_, _, result),) = store.batch_rows(store.latest_batch_ids(1)[0])
    merged = result.data["json"]
    assert (merged["company"], merged["revenue"], merged["net_income"], merged["total_assets"]) == (
        "Acme plc", 1200.0, 150.0, 5000.0)
    assert merged["segments"] == [{"name": "Cloud", "revenue": 700.0}, {"name": "Retail", "revenue": 500.0}]
    assert result.data["reduced_by"] == "merge"
    assert [w["code"] for w in result.data["warnings"]] == ["balance_sheet_mismatch"]  # 5000 vs 3000 + 1000


def test_parts_that_disagree_go_to_the_model_with_only_the_conflicts(worker_runtime, worker_settings):
    # Given two chunk answers that state different revenues
    store = worker_runtime.store
    queue = redis.Redis.from_url(worker_settings.broker_url)
    parent_id = _parent_with_chunk_answers(store, worker_settings, [
        _answer(company="Acme plc", revenue=1200.0), _answer(company="Acme plc", revenue=1250.0, cash=90.0)])
    # When the document moves on
    advance_parent(worker_runtime, parent_id, 1)
    # Then its job is ready for one more inference whose input is the merged answer and the conflict
    parent = store.get_job(parent_id)
    assert parent.state == JobState.READY
    ((part,),) = [parent.input_parts]
    assert part["text"].startswith('Merged answer:\n{"company":"Acme plc",')
    assert part["text"].endswith("Conflicting values (choose or combine; keep every stated fact):\n"
                                 "- revenue: [1200.0, 1250.0]")
    assert sum(queue.llen(key) for key in queue.keys("infer*")) == 1  # its message is on the infer queue
