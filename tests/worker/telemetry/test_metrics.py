"""The pure parts of a worker's metrics: which job outcome a task counts, and the engine statistics read
through the contract's attribute names (the scraped endpoint itself is in `test_service.py`)."""
from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from schemas.sql.models import Job
from schemas.states import JobState
from worker.telemetry.engine_metrics import EngineCollector, read_stats
from worker.telemetry.metrics import job_outcome

T0 = dt.datetime(2026, 11, 22, 8, 0, tzinfo=dt.timezone.utc)


def job(state: JobState, worker: str = "gpu0@h", **times: float) -> Job:
    """A job row whose timestamps are seconds after T0."""
    moments = {name: T0 + dt.timedelta(seconds=s) for name, s in times.items()}
    return Job(id="j", state=state, worker=worker, created_at=T0, error_code="schema_invalid"
               if state == JobState.FAILED else None, **moments)


def test_a_task_counts_the_job_it_ended_with_its_wait_and_run_time():
    task_started = (T0 + dt.timedelta(seconds=30)).timestamp()
    done = job_outcome(job(JobState.DONE, prepared_at=10, started_at=30, finished_at=42), "infer", "gpu0@h",
                       task_started, task_started + 12)
    assert (done.outcome, done.reason, done.queue_wait_s, done.run_s) == ("done", None, 20.0, 12.0)
    failed = job_outcome(job(JobState.FAILED, started_at=30, finished_at=31), "infer", "gpu0@h", task_started,
                         task_started + 1)
    assert (failed.outcome, failed.reason, failed.queue_wait_s) == ("failed", "schema_invalid", 30.0)


def test_a_duplicate_message_or_another_workers_job_counts_nothing():
    task_started = (T0 + dt.timedelta(seconds=100)).timestamp()
    ended_before = job(JobState.DONE, started_at=30, finished_at=42)
    assert job_outcome(ended_before, "infer", "gpu0@h", task_started, task_started + 1).outcome == "none"
    elsewhere = job(JobState.DONE, worker="gpu1@h", started_at=100, finished_at=101)
    assert job_outcome(elsewhere, "infer", "gpu0@h", task_started, task_started + 1).outcome == "none"
    assert job_outcome(None, "infer", "gpu0@h", task_started, task_started + 1).outcome == "none"


def test_a_prepare_task_counts_the_job_it_made_ready_even_once_an_infer_worker_owns_it():
    task_started = (T0 + dt.timedelta(seconds=5)).timestamp()
    taken_on = job(JobState.RUNNING, worker="gpu0@h", prepared_at=6, started_at=7)
    outcome = job_outcome(taken_on, "prepare", "prepare@h", task_started, task_started + 1)
    assert (outcome.outcome, outcome.queue_wait_s) == ("prepared", 5.0)


def test_the_engine_collector_exports_the_statistics_the_engine_has_and_leaves_out_the_rest():
    today = SimpleNamespace(tokens_out=480, num_batches=7, batch_sizes=[4, 3])  # only tokens_out is in the contract
    assert read_stats(today) == {"tokens_out": 480.0}
    paged = SimpleNamespace(num_running=12, num_waiting=3, num_steps=900, num_requests_finished=40, num_preemptions=1,
                            tokens_in=5000, tokens_out=7000, prefix_cache_hit_tokens=2048, kv_blocks_total=1000,
                            kv_blocks_used=250, kv_block_tokens=16, last_step_seqs=12, last_step_tokens=12,
                            model_load_s=41.5, weight_bytes=5.5 * 2**30, kv_capacity_tokens=1_000_000,
                            kv_capacity_sequences=244, kv_cache_bytes=None)
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: paged))
    value = registry.get_sample_value
    assert value("docbatch_engine_steps_total") == 900 and value("docbatch_engine_tokens_out_total") == 7000
    assert value("docbatch_engine_running_sequences") == 12 and value("docbatch_model_load_seconds") == 41.5
    assert value("docbatch_engine_kv_cache_usage_ratio") == 0.25
    assert value("docbatch_engine_weight_bytes") == 5.5 * 2**30 and value("docbatch_engine_kv_capacity_tokens") == 1e6
    assert value("docbatch_engine_kv_capacity_sequences_4k") == 244
    assert value("docbatch_engine_kv_cache_bytes") is None  # not known: left out
    stats = [today]
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: stats[0]))
    assert registry.get_sample_value("docbatch_engine_steps_total") is None
    assert registry.get_sample_value("docbatch_engine_tokens_out_total") == 480
    stats[0] = None  # a prepare worker: no engine at all
    assert list(registry.collect()) == []
