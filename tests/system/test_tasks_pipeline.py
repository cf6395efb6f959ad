"""The tasks through a real worker and the real small model: every `extract` answer validates and is
checked, a custom task file runs under its own schema, and an OpenAI Batch file makes the round trip.

One worker (SQLite, its own Redis database) serves the whole module."""
from __future__ import annotations

import importlib.resources
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import redis
from click.testing import CliRunner
from conftest import REDIS_URL, shared_worker_settings
from rich.console import Console

from producer.cli import main as cli
from producer.intake.submit import Source, submit
from schemas.messages import make_celery
from schemas.outputs import FinancialReport
from schemas.states import JobState
from schemas.sql.store import Store
from schemas.tasks import load_task_file
from worker.answers.checks import check_answer

pytestmark = pytest.mark.slow
SAMPLES = Path(str(importlib.resources.files("producer") / "samples"))
QUIET = Console(file=io.StringIO())
MODULE_REDIS_DB = 12
UNSERVED_REDIS_DB = 11  # no worker listens here: jobs submitted through it are made but never run


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory, small_model_dir):
    return shared_worker_settings(tmp_path_factory.mktemp("tasks"), small_model_dir, MODULE_REDIS_DB)


def _cli(settings, *args: str):
    return CliRunner().invoke(cli, list(args), env=settings.to_env())


def _submit_wait(settings, worker, *args: str) -> tuple[int, str]:
    """`docbatch submit ... --wait` as its own process: (exit code, batch id)."""
    assert worker.poll() is None, "the worker died"
    done = subprocess.run([sys.executable, "-m", "producer.cli", "submit", *args, "--wait"],
                          env={**os.environ, **settings.to_env()}, capture_output=True, text=True, timeout=900)
    assert done.returncode in (0, 1), done.stderr[-3000:]
    return done.returncode, done.stdout.strip().splitlines()[0]


def _financial_reports(folder: Path) -> None:
    """The three bundled financial reports, and five short ones with varied figures."""
    folder.mkdir()
    for sample in (SAMPLES / "financials").iterdir():
        (folder / sample.name).write_bytes(sample.read_bytes())
    for i in range(5):
        revenue, cost = 1200 + 150 * i, 700 + 40 * i
        (folder / f"quarter_{i}.txt").write_text(
            f"Northwind Holdings plc - Q{1 + i % 4} {2023 + i // 4} results (in millions of GBP).\n"
            f"Revenue {revenue}; cost of sales {cost}; operating profit {revenue - cost - 210}; net income "
            f"{revenue - cost - 300}. Basic EPS 0.{41 + i}, diluted EPS 0.{40 + i}. Total assets {5000 + i * 90}, "
            f"total liabilities {3100 + i * 50}, equity {1900 + i * 40}. Cash {610 + i}.")


def test_every_extract_answer_validates_and_carries_its_checks(module_settings, module_worker, tmp_path):
    # Given eight financial reports (text, Markdown and PDF)
    folder = tmp_path / "reports"
    _financial_reports(folder)
    # When they are extracted with constrained decoding through the worker
    code, batch_id = _submit_wait(module_settings, module_worker, str(folder), "--task", "extract")
    # Then all eight are done and every answer is a valid FinancialReport
    assert code == 0
    store = Store(module_settings.effective_database_url)
    rows = store.batch_rows(batch_id)
    assert len(rows) == 8 and all(job.state == JobState.DONE for _, job, _ in rows)
    for _, _, result in rows:
        FinancialReport.model_validate(result.data["json"])
        # ... and each carries the consistency checks of its own answer, as warnings (possibly none)
        assert result.data["warnings"] == [w.as_dict() for w in check_answer("extract", result.data["json"])]
    # And the Markdown report has a section per report with its figures table
    report = _cli(module_settings, "results", batch_id, "--format", "md")
    assert report.exit_code == 0, report.output
    lines = report.stdout.splitlines()
    assert lines[0] == f"# docbatch batch {batch_id}"
    assert sum(line.startswith("## ") for line in lines) == 8
    assert sum(line.startswith("| Revenue | ") for line in lines) == 8
    store.close()


def test_a_custom_task_runs_under_its_own_schema_and_is_stored_with_the_batch(module_settings, module_worker,
                                                                               tmp_path):
    # Given the bundled contracts and the bundled NDA-review task file (its own schema, its own prompt)
    task_file = SAMPLES / "tasks" / "nda_review.toml"
    task = load_task_file(task_file, module_settings)
    # When the contracts are submitted with it
    code, batch_id = _submit_wait(module_settings, module_worker, str(SAMPLES / "contracts"), "--task-file",
                                  str(task_file))
    # Then every answer validates against the task's schema
    assert code == 0
    store = Store(module_settings.effective_database_url)
    rows = store.batch_rows(batch_id)
    assert len(rows) == 4
    for item, job, result in rows:
        assert job.state == JobState.DONE and job.task == "nda_review"
        jsonschema.validate(result.data["json"], task.json_schema)
        assert job.params == {"task": task.hash, "filename": item.name}  # the prompt reads the file name
        assert "warnings" not in result.data  # no built-in checks for a custom schema
    # ... and the batch keeps the definition it ran with
    assert store.get_batch(batch_id).task_hash == task.hash
    assert store.get_task(task.hash) == task.model_dump(mode="json")
    # When the same files are submitted with the prompt reworded (through a queue no worker reads)
    reworded = tmp_path / "nda_review.toml"
    reworded.write_text(task_file.read_text().replace("Review this agreement", "Read this agreement"))
    unserved = module_settings.model_copy(update={"broker_url": f"{REDIS_URL}/{UNSERVED_REDIS_DB}"})
    again = submit(unserved, store, make_celery(unserved), Source(paths=(SAMPLES / "contracts",)),
                   load_task_file(reworded, module_settings), console=QUIET)
    same = submit(unserved, store, make_celery(unserved), Source(paths=(SAMPLES / "contracts",)), task, console=QUIET)
    # Then the reworded task is new work, while the unchanged one reuses every done job
    old_ids = {job.id for _, job, _ in rows}
    assert len(again.batch.to_enqueue) == 4 and not set(again.batch.to_enqueue) & old_ids
    assert (same.batch.num_reused_done, same.batch.to_enqueue) == (4, [])
    redis.Redis.from_url(unserved.broker_url).flushdb()
    store.close()


def test_an_openai_batch_file_makes_the_round_trip(module_settings, module_worker, tmp_path):
    # Given the bundled OpenAI Batch file (two JSON-schema requests, a json_object one, two identical
    # free-text ones, one for another endpoint) and one request longer than the model's input budget
    requests = tmp_path / "requests.jsonl"
    too_long = {"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word " * 9000}]}}
    requests.write_text((SAMPLES / "openai" / "requests.jsonl").read_text() + json.dumps(too_long) + "\n")
    sent = [json.loads(line) for line in requests.read_text().splitlines()]
    # When it is submitted and its results are written in OpenAI's output format
    code, batch_id = _submit_wait(module_settings, module_worker, "--openai-batch", str(requests))
    assert code == 1  # two requests failed
    output = _cli(module_settings, "results", batch_id, "--format", "openai")
    assert output.exit_code == 0, output.output
    lines = {line["custom_id"]: line for line in map(json.loads, output.stdout.splitlines())}
    # Then every custom_id comes back once
    assert sorted(lines) == sorted(request["custom_id"] for request in sent)
    # ... answers in the chat.completion shape, JSON answers valid against their request's schema
    for request in sent:
        line = lines[request["custom_id"]]
        if request["custom_id"] in ("wrong-endpoint", "too-long"):
            continue
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] > 0
        response_format = request["body"].get("response_format")
        if response_format and body["choices"][0]["finish_reason"] == "stop":
            schema = response_format.get("json_schema", {}).get("schema", {"type": "object"})
            jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), schema)
        elif response_format:  # cut off at the request's own max_tokens, returned as OpenAI does
            limit = request["body"].get("max_tokens") or request["body"].get("max_completion_tokens")
            assert body["usage"]["completion_tokens"] == limit
    # ... the two json_schema requests (each limited to 120 tokens) finished within their limit
    assert all(lines[i]["response"]["body"]["choices"][0]["finish_reason"] == "stop"
               for i in ("nda-terms", "invoice-fields"))
    # ... identical requests ran once, under both ids
    assert lines["nda-summary"]["response"]["request_id"] == lines["nda-summary-again"]["response"]["request_id"]
    assert (lines["nda-summary"]["response"]["body"]["choices"]
            == lines["nda-summary-again"]["response"]["body"]["choices"])
    # ... and failures in the error shape, with their reason codes
    assert lines["wrong-endpoint"]["response"] is None
    assert lines["wrong-endpoint"]["error"]["code"] == "invalid_request"
    assert "url must be /v1/chat/completions" in lines["wrong-endpoint"]["error"]["message"]
    assert lines["too-long"]["response"] is None and lines["too-long"]["error"]["code"] == "input_too_long"
