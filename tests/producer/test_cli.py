"""Command-line edges: the version, paths that do not exist, an OpenAI file with nothing to run, Redis down at
submit (one line, and the recorded batch goes out once Redis is back), `status` with tasks and labels in 80
columns, ids shortened to any unique prefix, configuration errors without pydantic's links, and no process that
starts with a placeholder password. Real parts: a redis-server of the test's own, SQLite."""
from __future__ import annotations

import os
import subprocess
import sys

import redis
from click.testing import CliRunner

from producer.cli import main as cli
from producer.service.embedded import embedded_redis, free_port, redis_server_binary
from producer.service.top_data import queue_lengths
from schemas.settings import Settings
from services import wait_for


def invoke(settings: Settings, *args: str):
    return CliRunner().invoke(cli, list(args), env=settings.to_env())


def test_version_and_a_missing_path_and_an_openai_file_with_nothing_to_run(tmp_path):
    settings = Settings(home=tmp_path / "home", broker_url=f"redis://127.0.0.1:{free_port()}/0")
    version = invoke(settings, "--version")
    assert version.exit_code == 0 and version.output.startswith("docbatch ")
    missing = invoke(settings, "submit", str(tmp_path / "nowhere"), "--task", "summarize")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n')
    nothing = invoke(settings, "submit", "--openai-batch", str(requests))
    assert nothing.exit_code == 1 and "no request line docbatch can run (1 rejected" in nothing.output


def test_submit_with_redis_down_says_so_in_one_line_and_the_batch_goes_out_once_redis_is_back(tmp_path):
    # Given a folder, and no Redis at the configured port
    port = free_port()
    settings = Settings(home=tmp_path / "home", broker_url=f"redis://127.0.0.1:{port}/0")
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(2):
        (folder / f"d{i}.txt").write_text(f"Agreement {i}.")
    command = [sys.executable, "-m", "producer.cli", "submit", str(folder), "--task", "summarize"]
    env = {**os.environ, **settings.to_env()}

    # When it is submitted
    down = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    # Then one line says what happened and what comes next, the batch id is printed, the exit code is 3
    assert down.returncode == 3, down.stderr
    lines = [line for line in down.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach Redis at redis://127.0.0.1" in lines[0], down.stderr
    batch_id = down.stdout.strip()
    assert f"Batch {batch_id} is recorded with 2 jobs queued" in lines[0]

    # When Redis is back and the same inputs are submitted again
    server = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis.from_url(settings.broker_url)
        wait_for(lambda: _pings(client), "redis-server to start", timeout_s=30, every_s=0.1)
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        # Then the two jobs of the recorded batch are sent
        assert again.returncode == 0, again.stderr
        assert queue_lengths(client)["prepare"] == 2
        status = invoke(settings, "status", batch_id, "--json")
        assert '"queued":2' in status.output
    finally:
        server.terminate()
        server.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_status_shows_each_batchs_task_and_label(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("Agreement A.")
    with embedded_redis() as url:
        settings = Settings(home=tmp_path / "home", broker_url=url)
        submitted = invoke(settings, "submit", str(folder), "--task", "extract", "--label", "filings")
        assert submitted.exit_code == 0, submitted.output
        status = invoke(settings, "status")
    assert status.exit_code == 0
    row = next(line for line in status.output.splitlines() if submitted.stdout.strip()[:12] in line)
    assert "extract" in row and "filings" in row
    assert "no worker heard from in the last 60 s" in status.output  # and who holds what, when workers run
    # ... in 80 columns (what a CliRunner's console has), every header whole
    header = status.output.splitlines()[0]
    assert header.split() == ["batch", "task", "label", "total", "pending", "running", "done", "failed", "cancelled"]
    assert max(len(line) for line in status.output.splitlines()) <= 80


def test_cancel_then_retry_a_batch_and_list_the_workers(tmp_path):
    # Given a submitted batch of two documents, no worker running
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text(f"Agreement {name}.")
    with embedded_redis() as url:
        settings = Settings(home=tmp_path / "home", broker_url=url)
        batch_id = invoke(settings, "submit", str(folder), "--task", "summarize").stdout.strip()
        # When it is cancelled, named by the first 8 characters of its id (as the progress line prints it)
        cancelled = invoke(settings, "cancel", batch_id[:8])
        # Then both jobs are cancelled, and status says so (named by 6 characters)
        assert cancelled.exit_code == 0 and f"cancelled 2 jobs of batch {batch_id}" in cancelled.output
        assert '"cancelled":2' in invoke(settings, "status", batch_id[:6], "--json").stdout.replace(" ", "")
        # When it is retried, both are queued and sent again
        client = redis.Redis.from_url(url)
        before = queue_lengths(client)["prepare"]
        retried = invoke(settings, "retry", batch_id[:12])
        assert retried.exit_code == 0 and f"queued 2 jobs of batch {batch_id} again" in retried.output
        assert queue_lengths(client)["prepare"] == before + 2
        # ... and one job alone can be cancelled by its id's prefix, its results read by the batch's
        job_id = invoke(settings, "results", batch_id[:7]).stdout.split('"job_id":"')[1][:32]
        one = invoke(settings, "cancel", job_id[:9])
        assert one.exit_code == 0 and f"cancelled 1 job of job {job_id}" in one.output
        # And with no worker alive, `workers` says so; an unknown or too short id is refused, saying why
        assert "no worker heard from" in invoke(settings, "workers").output
        unknown = invoke(settings, "cancel", "abcdef0")
        assert unknown.exit_code == 1 and "no batch or job 'abcdef0'" in unknown.output
        short = invoke(settings, "status", "abc")
        assert short.exit_code == 1 and "give at least 6 characters of the batch id" in short.output


def test_a_bad_setting_is_named_without_pydantics_links(tmp_path):
    settings = Settings(home=tmp_path / "home")
    bad = CliRunner().invoke(cli, ["status"], env={**settings.to_env(), "DOCBATCH_MAX_BATCH_SIZE": "0"})
    assert bad.exit_code == 1
    assert bad.output.strip() == ("Error: bad configuration: DOCBATCH_MAX_BATCH_SIZE: Input should be greater than "
                                  "or equal to 1")


def test_no_docbatch_process_starts_with_a_placeholder_or_short_password(tmp_path):
    # Given the settings compose makes from deploy/example.env as it ships (its change-me-... passwords)
    settings = Settings(home=tmp_path / "home", broker_url="redis://:change-me-redis@127.0.0.1:1/0",
                        flower_user="admin", flower_password="short")
    # When each process that serves is started: worker, beat, flower, the API, up, and compose's migrate step
    for command in (["worker", "--gpus", "none"], ["beat"], ["flower"], ["api"], ["up"], ["migrate"]):
        refused = invoke(settings, *command)
        # Then it refuses before it starts, naming each setting and how to make a good password
        assert refused.exit_code == 1, (command, refused.output)
        assert "refusing to start with a weak password" in refused.output
        assert "DOCBATCH_BROKER_URL: the password is deploy/example.env's placeholder ('change-me-redis')" in \
            refused.output
        assert "DOCBATCH_FLOWER_PASSWORD: the password has 5 characters, fewer than 12" in refused.output
        assert "secrets.token_urlsafe(24)" in refused.output
