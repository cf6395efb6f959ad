"""The HTTP API driven by the real `openai` SDK (no HTTP mocking) against `docbatch api` processes and a real
`docbatch worker` running the packaged model on this machine's Redis, over one SQLite store.

One worker serves the module, with `max_inflight` 2 so that a batch of eight requests is still mostly queued when it
is cancelled. Answers are a few tokens long: what is asserted is what happens around the model. A second API process
over the same store sends its messages to a Redis database no worker reads: what it queues never runs, which makes a
completion window end with work unfinished."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner
from conftest import PARTIES_TASK_FILE, REDIS_URL, shared_worker_settings
from documents import pdf
from services import api_process, wait_for

from producer.cli import main as cli
from producer.service.embedded import free_port
from schemas.settings import Settings

pytestmark = pytest.mark.slow
MODULE_REDIS_DB = 7
UNSERVED_REDIS_DB = 6  # no worker reads it
SECRET_PHRASE = "Zanzibar-7731 quarterly"  # in request content; must never reach a log
ENDED = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory, small_model_dir) -> Settings:
    return shared_worker_settings(
        tmp_path_factory.mktemp("api"), small_model_dir, MODULE_REDIS_DB, max_inflight=2, api_port=free_port(),
        api_tasks=(PARTIES_TASK_FILE,), api_refresh_s=0, api_sweep_interval_s=0.3, api_max_upload_bytes=1_000_000)


@pytest.fixture(scope="module")
def api_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api-logs") / "api.log"


@pytest.fixture(scope="module")
def api_server(module_settings, module_worker, api_log):
    with api_process(module_settings, api_log) as process:
        yield process


@pytest.fixture(scope="module")
def keys(module_settings) -> dict[str, str]:
    """Two keys made with the CLI, and a third made and then revoked."""
    env = module_settings.to_env()
    made = {}
    for name in ("alice", "bob", "gone"):
        result = CliRunner().invoke(cli, ["api-key", "create", name], env=env)
        assert result.exit_code == 0, result.output
        made[name] = result.stdout.strip()
    assert CliRunner().invoke(cli, ["api-key", "revoke", "gone"], env=env).exit_code == 0
    listed = CliRunner().invoke(cli, ["api-key", "list"], env=env).stdout
    assert all(name in listed for name in made) and made["alice"] not in listed  # the key itself is never shown again
    return made


def client(settings: Settings, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{settings.api_port}/v1", api_key=key, max_retries=0)


def chat_line(custom_id: str, text: str, max_tokens: int = 3, **fields) -> str:
    body = {"model": "anything", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, **fields}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def upload(api: openai.OpenAI, lines: list[str], name: str = "requests.jsonl"):
    return api.files.create(file=(name, "\n".join(lines).encode()), purpose="batch")


def wait_until_ended(api: openai.OpenAI, batch_id: str, timeout_s: float = 300):
    return wait_for(lambda: (b := api.batches.retrieve(batch_id)).status in ENDED and b, f"batch {batch_id} to end",
                    timeout_s=timeout_s, every_s=0.3)


def lines_of(api: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(line) for line in api.files.content(file_id).text.splitlines()] if file_id else []


def test_a_batch_runs_to_completed_with_answers_and_errors_split_as_openai_splits_them(
        module_settings, api_server, keys, api_log):
    # Given three requests docbatch can run and two it cannot (another endpoint, several choices)
    api = client(module_settings, keys["alice"])
    lines = [chat_line(f"ok-{i}", f"{SECRET_PHRASE}: say hello number {i}") for i in range(3)]
    lines += [json.dumps({"custom_id": "embed", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}),
              chat_line("many", "hi", n=2)]
    source = upload(api, lines)

    # When a batch is made of them and polled until it ends
    batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"project": "tests"})
    seen = {batch.status}
    while (batch := api.batches.retrieve(batch.id)).status not in ENDED:
        seen.add(batch.status)
        time.sleep(0.3)

    # Then it completed, counting every request, with the answers' tokens as usage
    assert batch.status == "completed" and "in_progress" in seen
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 3, 2)
    assert batch.usage.input_tokens > 0 and batch.usage.output_tokens > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    assert batch.in_progress_at <= batch.finalizing_at <= batch.completed_at and batch.metadata == {"project": "tests"}
    # ... the answers are in the output file and the refused lines in the error file, with their line numbers
    output, errors = lines_of(api, batch.output_file_id), lines_of(api, batch.error_file_id)
    assert sorted(line["custom_id"] for line in output) == [f"ok-{i}" for i in range(3)]
    assert all(line["response"]["status_code"] == 200 and line["response"]["body"]["choices"][0]["message"]["content"]
               for line in output)
    assert {line["custom_id"]: line["error"]["code"] for line in errors} == {"embed": "invalid_request",
                                                                             "many": "invalid_request"}
    assert next(line for line in errors if line["custom_id"] == "embed")["error"]["message"].startswith("line 4:")
    assert api.files.retrieve(batch.output_file_id).purpose == "batch_output"
    # ... each line exactly as `docbatch results --format openai` writes it, the batch being a docbatch batch
    env = module_settings.to_env()
    docbatch_id = batch.id.removeprefix("batch_")
    exported = CliRunner().invoke(cli, ["results", docbatch_id, "--format", "openai"], env=env).stdout
    served = api.files.content(batch.output_file_id).text + api.files.content(batch.error_file_id).text
    assert sorted(exported.splitlines()) == sorted(served.splitlines())
    status = json.loads(CliRunner().invoke(cli, ["status", docbatch_id, "--json"], env=env).stdout)
    assert (status["total"], status["done"], status["failed"]) == (5, 3, 2)
    # ... a completed batch cannot be cancelled
    with pytest.raises(openai.ConflictError):
        api.batches.cancel(batch.id)
    # ... and no request's content reached the server's log
    assert SECRET_PHRASE not in api_log.read_text()


def test_files_and_batches_are_listed_newest_first_page_by_page(module_settings, api_server, keys):
    # Given a key with three files and three batches of its own (whose requests do not matter here: bad lines)
    api = client(module_settings, keys["bob"])
    files = [upload(api, [json.dumps({"custom_id": f"x{i}", "url": "/v1/nope", "body": {}})]) for i in range(3)]
    batches = [api.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
               for f in files]

    # When they are listed one per page (the SDK follows `after` from page to page)
    listed_files = [f.id for f in api.files.list(limit=1, purpose="batch")]
    listed_batches = [b.id for b in api.batches.list(limit=1)]
    first_page = api.batches.list(limit=2)

    # Then every one comes once, newest first, and a page says whether more follow
    assert listed_files == [f.id for f in reversed(files)]
    assert listed_batches == [b.id for b in reversed(batches)]
    assert [b.id for b in first_page.data] == listed_batches[:2] and first_page.has_more
    assert [b.id for b in api.batches.list(after=listed_batches[1], limit=5).data] == listed_batches[2:]
    # ... and a file whose every line is invalid failed its batch, with errors naming the lines
    failed = wait_until_ended(api, batches[0].id)
    assert failed.status == "failed" and failed.failed_at
    assert [(e.code, e.line) for e in failed.errors.data] == [("invalid_request", 1)]


def test_a_file_that_is_not_json_lines_fails_its_batch_with_errors(module_settings, api_server, keys):
    api = client(module_settings, keys["alice"])
    not_utf8 = api.files.create(file=("scan.jsonl", b"\xff\xd8\xff\xe0 a JPEG, not JSON lines"), purpose="batch")
    duplicated = upload(api, [chat_line("same", "a"), chat_line("other", "b"), chat_line("same", "c")])

    first = api.batches.create(input_file_id=not_utf8.id, endpoint="/v1/chat/completions", completion_window="24h")
    second = api.batches.create(input_file_id=duplicated.id, endpoint="/v1/chat/completions", completion_window="24h")

    first, second = wait_until_ended(api, first.id), wait_until_ended(api, second.id)
    assert first.status == "failed" and first.errors.data[0].code == "invalid_file_format"
    assert second.status == "failed" and (second.errors.data[0].code, second.errors.data[0].line) == (
        "duplicate_custom_id", 3)
    assert first.output_file_id is None and first.request_counts.total == 0


def test_cancel_mid_run_ends_cancelled_with_the_finished_lines_in_its_output(module_settings, api_server, keys):
    # Given eight requests on a worker that runs two at a time
    api = client(module_settings, keys["alice"])
    source = upload(api, [chat_line(f"c{i:02d}", f"count to {i}") for i in range(8)])
    batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(lambda: api.batches.retrieve(batch.id).request_counts.completed >= 1, "a first answer", every_s=0.1)

    # When it is cancelled after the first answer
    cancelling = api.batches.cancel(batch.id)
    ended = wait_until_ended(api, batch.id)

    # Then it went cancelling -> cancelled; the finished lines are in its output, the others cancelled
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    assert ended.status == "cancelled" and ended.cancelled_at
    output, errors = lines_of(api, ended.output_file_id), lines_of(api, ended.error_file_id)
    assert len(output) == ended.request_counts.completed >= 1
    assert errors and all(line["error"]["code"] == "cancelled" for line in errors)
    assert sorted(line["custom_id"] for line in output + errors) == [f"c{i:02d}" for i in range(8)]
    # ... and cancelling it again changes nothing
    assert api.batches.cancel(batch.id).status == "cancelled"


def test_a_document_task_line_runs_docbatchs_task_on_an_uploaded_pdf(module_settings, api_server, keys):
    # Given a contract uploaded as a PDF, and a line asking the `parties` task (api_tasks) of it
    api = client(module_settings, keys["alice"])
    document = api.files.create(file=("nda.pdf", pdf(["Mutual NDA between Acme Corp and Globex Ltd, 1 May 2024."])),
                                purpose="user_data")
    url = "/v1/docbatch/tasks/parties"
    line = json.dumps({"custom_id": "nda", "method": "POST", "url": url, "body": {"file_id": document.id}})
    missing = json.dumps({"custom_id": "ghost", "method": "POST", "url": url, "body": {"file_id": "file-nope"}})

    # When the batch runs
    batch = api.batches.create(input_file_id=upload(api, [line, missing]).id, endpoint=url, completion_window="24h")
    ended = wait_until_ended(api, batch.id)

    # Then the document's answer is the task's JSON, and a line naming no file of this key failed alone
    assert ended.status == "completed"
    (answer,) = lines_of(api, ended.output_file_id)
    assert answer["custom_id"] == "nda"
    assert isinstance(json.loads(answer["response"]["body"]["choices"][0]["message"]["content"])["parties"], list)
    (refused,) = lines_of(api, ended.error_file_id)
    assert refused["custom_id"] == "ghost" and "no user_data file file-nope" in refused["error"]["message"]
    assert api.files.content(document.id).content.startswith(b"%PDF")


def test_keys_guard_every_request_and_see_only_their_own(module_settings, api_server, keys):
    alice, bob = client(module_settings, keys["alice"]), client(module_settings, keys["bob"])
    source = upload(alice, [chat_line("a", "hi")])
    batch = alice.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")

    # Without a key, with a wrong one or a revoked one: 401 in OpenAI's error shape
    status, body = raw(module_settings, None, "GET", "/v1/batches", None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "Authorization" in body["error"]["message"]
    for key in ("dbk_000000000000_wrong", keys["alice"][:-2] + "xx", keys["gone"]):
        with pytest.raises(openai.AuthenticationError) as info:
            client(module_settings, key).batches.list()
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    # Another key's batch and file are 404 (never 403), and its lists hold none of them
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(source.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert source.id not in {f.id for f in bob.files.list()}
    # A deleted file is gone: 404
    assert alice.files.delete(source.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(source.id)


def test_bodies_are_size_limited_and_malformed_requests_answered_in_openais_shape(module_settings, api_server, keys):
    api = client(module_settings, keys["alice"])
    # An upload over api_max_upload_bytes (1 MB here): 413
    with pytest.raises(openai.APIStatusError) as info:
        api.files.create(file=("big.jsonl", b"x" * 1_500_000), purpose="batch")
    assert info.value.status_code == 413
    # A JSON body over api_max_request_bytes: 413
    with pytest.raises(openai.APIStatusError) as info:
        api.batches.create(input_file_id="file-x", endpoint="/v1/chat/completions", completion_window="24h",
                           extra_body={"padding": "x" * 1_100_000})
    assert info.value.status_code == 413
    # Malformed JSON: 400 saying where; an unknown endpoint: 404; an unknown body field: 400 naming it
    malformed = b'{"input_file_id": "f",\n  "endpoint": }'
    status, body = raw(module_settings, keys["alice"], "POST", "/v1/batches", malformed)
    assert status == 400 and "line 2 column 15" in body["error"]["message"]
    assert raw(module_settings, keys["alice"], "GET", "/v1/models", None)[0] == 404
    with pytest.raises(openai.BadRequestError) as info:
        api.batches.create(input_file_id="file-x", endpoint="/v1/embeddings", completion_window="24h")
    assert info.value.body["param"] == "endpoint"


def test_an_expired_window_keeps_finished_lines_and_expires_the_rest(module_settings, api_server, keys, tmp_path):
    # Given a request this key already ran, and a second API process over the same store whose messages no worker
    # reads, with output files that expire 4 s after they are written
    api = client(module_settings, keys["alice"])
    known = chat_line("known", "say yes")
    assert wait_until_ended(api, api.batches.create(input_file_id=upload(api, [known]).id,
                                                    endpoint="/v1/chat/completions",
                                                    completion_window="24h").id).status == "completed"
    unserved = module_settings.model_copy(update={"api_port": free_port(), "api_output_expires_s": 4,
                                                  "broker_url": f"{REDIS_URL}/{UNSERVED_REDIS_DB}"})
    with api_process(unserved, tmp_path / "unserved.log"):
        other = client(unserved, keys["alice"])

        # When a batch of the known request and a new one gets a window of 2 s
        batch = other.batches.create(input_file_id=upload(other, [known, chat_line("new", "say no")]).id,
                                     endpoint="/v1/chat/completions", completion_window="2s")
        ended = wait_until_ended(other, batch.id, timeout_s=60)

        # Then the batch expired: the finished line kept, the other expired (a reason code)
        assert ended.status == "expired" and ended.expired_at >= ended.expires_at
        assert (ended.request_counts.completed, ended.request_counts.failed) == (1, 1)
        assert [line["custom_id"] for line in lines_of(other, ended.output_file_id)] == ["known"]
        (expired,) = lines_of(other, ended.error_file_id)
        assert expired["custom_id"] == "new" and expired["error"]["code"] == "expired"
        # ... and once its output file's time is up, the file answers 410, saying so
        def gone() -> bool:
            try:
                other.files.retrieve(ended.output_file_id)
            except openai.APIStatusError as e:
                return e.status_code == 410 and "expired" in e.message
            return False
        wait_for(gone, "the output file to expire", timeout_s=30)


def test_the_server_refuses_to_listen_beyond_loopback_without_a_key(tmp_path):
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    result = CliRunner().invoke(cli, ["api", "--address", "0.0.0.0"], env=settings.to_env())
    assert result.exit_code == 1 and "without an API key" in result.output


def raw(settings: Settings, key: str | None, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
    """A request the SDK would never send (no key, malformed JSON, an endpoint it does not have)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{settings.api_port}{path}", data=body, method=method,
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
