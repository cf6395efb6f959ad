"""Task definitions: built-ins and TOML task files, their templates, schemas and hashes."""
from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest

from schemas.outputs import FinancialReport
from schemas.settings import Settings
from schemas.tasks import TaskDefinition, builtin_task, load_task_file

SETTINGS = Settings(max_new_tokens=300, repetition_penalty=1.05)
SAMPLE_TASK = Path(str(importlib.resources.files("producer") / "samples" / "tasks" / "nda_review.toml"))
METADATA = dict(filename="inbox/a.pdf", media_type="application/pdf", num_pages=3, sha256="ab" * 32)


def _write(tmp_path: Path, text: str, name: str = "task.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_sample_task_file_loads_with_its_schema_and_generation():
    task = load_task_file(SAMPLE_TASK, SETTINGS)
    assert task.name == "nda_review" and task.kind == "document"
    assert task.json_schema["required"] == ["is_nda", "mutual", "confidentiality_months", "governing_law", "parties"]
    # generation: the file's own keys, the rest from the settings
    assert (task.generation.max_new_tokens, task.generation.temperature, task.generation.repetition_penalty) == (
        200, 0.0, 1.05)
    assert task.uses_filename and not task.uses_stored_metadata
    counted = task.model_copy(update={"prompt": "{{ num_pages }} pages:\n{{ text }}"})
    assert TaskDefinition.model_validate(counted.model_dump()).uses_stored_metadata
    prompt = task.render("THE TEXT", **METADATA)
    assert prompt.startswith("Agreement file: inbox/a.pdf\n\nTHE TEXT\n\nReview this agreement as JSON")


def test_a_schema_file_beside_the_task_file_is_read(tmp_path):
    (tmp_path / "answer.json").write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                      "required": ["ok"]}))
    task = load_task_file(_write(tmp_path, 'name = "t"\nprompt = "{{ text }} ok?"\njson_schema_file = "answer.json"\n'),
                          SETTINGS)
    assert task.json_schema["required"] == ["ok"] and not task.uses_filename
    assert task.generation.max_new_tokens == 300


@pytest.mark.parametrize("body, message", [
    ('name = "t"\nprompt = "no text here"\n', "must use {{ text }} exactly once (found 0)"),
    ('name = "t"\nprompt = "{{ text }} and {{ text }}"\n', "must use {{ text }} exactly once (found 2)"),
    ('name = "t"\nprompt = "{{ text }} {{ author }}"\n', "unknown variable(s) author"),
    ('name = "t"\nprompt = "{{ text }"\n', "template error on line 1"),
    ('name = "t"\nprompt = "{{ text }}"\n[json_schema]\ntype = "no-such-type"\n',
     "json_schema: not a valid JSON schema"),
    ('name = "t"\nprompt = "{{ text }}"\n[generation]\ntemperature = 5\n', "generation.temperature"),
    ('name = "t"\nprompt = "{{ text }}"\ncolour = "red"\n', "colour: Extra inputs are not permitted"),
    ('name = "bad name!"\nprompt = "{{ text }}"\n', "name: String should match pattern"),
    ('name = "t"\nprompt = "{{ text }}"\nreduce_prompt = "{{ filename }} {{ text }}"\n', "reduce_prompt: unknown"),
    ('name = "t\nprompt = 1', "not valid TOML"),
])
def test_a_bad_task_file_is_refused_with_what_is_wrong(tmp_path, body, message):
    with pytest.raises(ValueError) as info:
        load_task_file(_write(tmp_path, body), SETTINGS)
    assert message in str(info.value) and "task.toml" in str(info.value)


def test_a_schema_llguidance_cannot_compile_is_refused_at_load(tmp_path):
    body = 'name = "t"\nprompt = "{{ text }}"\n[json_schema]\ntype = "string"\npattern = "(?<=a)b"\n'
    with pytest.raises(ValueError, match="json_schema: "):
        load_task_file(_write(tmp_path, body), SETTINGS)


def test_the_hash_covers_the_whole_definition_and_survives_a_round_trip(tmp_path):
    task = load_task_file(SAMPLE_TASK, SETTINGS)
    assert TaskDefinition.model_validate(json.loads(json.dumps(task.model_dump(mode="json")))).hash == task.hash
    reworded = task.model_copy(update={"prompt": task.prompt.replace("Review", "Read")})
    assert TaskDefinition.model_validate(reworded.model_dump()).hash != task.hash
    longer = load_task_file(SAMPLE_TASK, Settings(max_new_tokens=300, repetition_penalty=1.2))
    assert longer.hash != task.hash  # a decoding setting from the configuration is part of the definition


def test_built_in_tasks_carry_their_schema_checks_and_the_configured_decoding():
    extract = builtin_task("extract", SETTINGS)
    assert extract.json_schema == FinancialReport.model_json_schema() and extract.checks == "extract"
    assert extract.generation.max_new_tokens == 300 and extract.generation.temperature == 0
    assert "prefer the one stated as a total" in extract.render_reduce("ANSWERS")
    assert builtin_task("summarize", SETTINGS).hash != builtin_task("summarize", Settings(max_new_tokens=301)).hash
    chat = builtin_task("chat", SETTINGS)
    assert chat.kind == "chat" and chat.generation.temperature == 1.0 and chat.json_schema is None
    with pytest.raises(ValueError, match="unknown task 'translate'"):
        builtin_task("translate", SETTINGS)


def test_the_text_around_the_document_splits_the_prompt_where_the_text_goes():
    task = builtin_task("summarize", SETTINGS)
    before, after = task.around_text(**METADATA)
    assert before == 'Document:\n"""\n' and after.startswith('\n"""\n\nSummarize this contract as JSON')
    assert before + "DOC" + after == task.render("DOC", **METADATA)
    assert task.around_text(reduce=True)[1].startswith("\n\nThese are answers for consecutive parts")
