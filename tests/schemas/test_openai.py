"""The OpenAI Batch file formats: request lines parsed and stored, output lines in OpenAI's shape."""
from __future__ import annotations

import datetime as dt
import importlib.resources
import json
from pathlib import Path

import pytest

from producer.intake.openai_batch import render_openai, store_request_file
from schemas.openai import CHAT_MEDIA_TYPE, ChatRequest, InvalidRequest, parse_request_line
from schemas.records import JobRecord
from schemas.states import JobState

SAMPLE = Path(str(importlib.resources.files("producer") / "samples" / "openai" / "requests.jsonl"))


def _line(custom_id="r1", url="/v1/chat/completions", **body) -> str:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_a_request_line_becomes_its_custom_id_and_a_canonical_body():
    custom_id, request = parse_request_line(_line(max_tokens=5, temperature=0.2, user="u-1"))
    assert custom_id == "r1" and request.max_tokens == 5 and request.temperature == 0.2
    # model and user do not change the answer: the same request for another model is the same document
    _, same = parse_request_line(_line(max_tokens=5, temperature=0.2, model="other-model"))
    assert request.canonical_bytes() == same.canonical_bytes()
    assert ChatRequest.model_validate_json(request.canonical_bytes()) == request


def test_text_parts_are_joined_and_developer_messages_are_system_messages():
    _, request = parse_request_line(_line(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]}]))
    assert request.chat_messages() == [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Part one.\nPart two."}]


def test_response_formats_give_the_answer_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    _, given = parse_request_line(_line(response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": schema}}))
    _, any_object = parse_request_line(_line(response_format={"type": "json_object"}))
    _, text = parse_request_line(_line(response_format={"type": "text"}))
    assert (given.answer_schema(), any_object.answer_schema(), text.answer_schema()) == (
        schema, {"type": "object"}, None)
    assert b'"schema":' in given.canonical_bytes()  # stored under OpenAI's own key


@pytest.mark.parametrize("line, custom_id, message", [
    ("not json", None, "not JSON"),
    ('["a list"]', None, "must be a JSON object"),
    (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}), None, "custom_id must be"),
    (_line(url="/v1/embeddings"), "r1", "url must be /v1/chat/completions"),
    (_line(n=2), "r1", "body: invalid body: n:"),
    (_line(stream=True), "r1", "stream: Extra inputs are not permitted"),
    (_line(temperature=3), "r1", "temperature: Input should be less than or equal to 2"),
    (_line(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "r1",
     "content parts of type 'image_url' are not supported"),
    (_line(response_format={"type": "json_schema"}), "r1", "type json_schema needs a json_schema"),
    (_line(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}), "r1",
     "response_format: not a valid JSON schema"),
])
def test_a_request_docbatch_cannot_run_is_refused_with_why(line, custom_id, message):
    with pytest.raises(InvalidRequest) as info:
        parse_request_line(line)
    assert info.value.custom_id == custom_id and message.removeprefix("body: ") in str(info.value)


def test_a_file_is_stored_request_by_request_and_bad_lines_become_rejects(store, tmp_path):
    items, rejects, num_new = store_request_file(store, SAMPLE)
    names = [name for name, _ in items]
    assert names == ["nda-terms", "invoice-fields", "nda-summary", "nda-summary-again", "invoice-any-json"]
    # two identical requests are one document (and so one job), under their own custom_ids
    shas = dict(items)
    assert shas["nda-summary"] == shas["nda-summary-again"] and num_new == 4
    assert store.read_document(shas["nda-terms"])[1] == CHAT_MEDIA_TYPE
    ((reject),) = rejects
    assert (reject.name, reject.code.value) == ("wrong-endpoint", "invalid_request")
    assert reject.message.startswith("line 6: url must be /v1/chat/completions")
    # a line without a readable custom_id is named by its line number
    path = tmp_path / "one.jsonl"
    path.write_text(_line("ok") + "\n\n{oops\n")
    _, rejects, _ = store_request_file(store, path)
    assert [r.name for r in rejects] == ["line 3"]


@pytest.mark.parametrize("text, message", [
    (_line("a") + "\n" + _line("b") + "\n" + _line("a", url="/v1/embeddings") + "\n",
     "custom_id 'a' is on lines 1 and 3"),
    ("", "holds no requests"),
])
def test_a_file_that_cannot_be_run_is_refused_whole(store, tmp_path, text, message):
    path = tmp_path / "requests.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        store_request_file(store, path)


def test_output_lines_have_openai_shape_for_answers_errors_and_unfinished_requests():
    finished = dt.datetime(2026, 11, 21, 9, 0, tzinfo=dt.timezone.utc)
    common = dict(sha256="s", task="chat", model="smollm2-135m", finished_at=finished)
    records = [
        JobRecord(job_id="j1", name="a", state=JobState.DONE, tokens_in=20, tokens_out=4, **common,
                  result={"text": '{"x": 1}', "json": {"x": 1}, "finish_reason": "stop"}),
        JobRecord(job_id="j2", name="b", state=JobState.FAILED, error_code="input_too_long",
                  error_message="the messages take 9000 tokens", **common),
        JobRecord(job_id=None, name="c", state=JobState.FAILED, error_code="invalid_request",
                  error_message="line 3: url must be", **common),
        JobRecord(job_id="j4", name="d", state=JobState.RUNNING, **common),
        JobRecord(job_id="j5", name="e", state=JobState.DONE, tokens_in=10, tokens_out=8, **common,
                  result={"json": {"company": None}, "input_truncated": False}),
    ]
    lines = [json.loads(line) for line in render_openai(records).splitlines()]
    assert [line["custom_id"] for line in lines] == ["a", "b", "c", "d", "e"]
    done = lines[0]
    assert done["id"] == "batch_req_j1" and done["error"] is None
    assert done["response"]["status_code"] == 200 and done["response"]["request_id"] == "j1"
    body = done["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "smollm2-135m"
    assert body["created"] == int(finished.timestamp())
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": '{"x": 1}', "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}
    assert lines[1] == {"id": "batch_req_j2", "custom_id": "b", "response": None,
                        "error": {"code": "input_too_long", "message": "the messages take 9000 tokens"}}
    assert lines[2]["id"] == "batch_req_c" and lines[2]["error"]["code"] == "invalid_request"
    assert lines[3]["error"] == {"code": "not_finished", "message": "the request is still running"}
    # a document task's answer is given as its JSON text
    assert json.loads(lines[4]["response"]["body"]["choices"][0]["message"]["content"]) == {"company": None}
