"""Schema-constrained decoding on the real small model: every constrained answer follows its schema (whole, or cut
at the token limit), rows with different schemas (or none) share one batch, and without the constraint the same
prompt leaves the schema."""
from __future__ import annotations

import importlib.resources
import json
import re

import pytest
from pydantic import ValidationError

from schemas.outputs import ContractSummary, FinancialReport
from schemas.settings import Settings
from schemas.states import DocbatchError, ErrorCode
from schemas.tasks import builtin_task
from worker.engine.request import GenerationOptions, ModelInput
from worker.documents.extract import extract_pages
from worker.engine.grammar import GrammarCache
from worker.engine.hf_generator import HFGenerator
from worker.answers.prompts import build_text_prompt, validate_json

pytestmark = pytest.mark.slow
SAMPLES = importlib.resources.files("producer") / "samples"
OPTIONS = GenerationOptions(repetition_penalty=1.1)
# Room for the report's whole extraction (about 200 tokens); a ContractSummary starts with its summary (up to 800
# characters), inside which the 135M model may loop until it is cut (the worker gives such an answer a second try
# at twice the room), so the batch runs to this limit.
ANSWER_TOKENS = 384
PREFIX_TOKENS = 64  # enough of an unconstrained answer to name a few of its fields
TASKS = {name: builtin_task(name, Settings(max_new_tokens=ANSWER_TOKENS)) for name in ("summarize", "extract")}


def _document(folder: str, name: str) -> str:
    return "\n\n".join(p.text for p in extract_pages((SAMPLES / folder / name).read_bytes()))


def _prompts(tokenizer, task: str, texts: list[str]) -> list[ModelInput]:
    return [build_text_prompt(tokenizer, TASKS[task].render, text, 4096).model_input for text in texts]


REPORT = "q3_2024_earnings_release.txt"


def _valid(model, text: str) -> bool:
    try:
        model.model_validate_json(text)
        return True
    except ValidationError:
        return False


def test_constrained_answers_follow_their_own_schemas_and_mixed_schemas_share_a_batch(small_model_as_worker):
    # Given a financial report (extract), a contract (summarize) and a free-text row, in one batch
    tokenizer = small_model_as_worker.tokenizer
    reports = _prompts(tokenizer, "extract", [_document("financials", REPORT)])
    contract = _prompts(tokenizer, "summarize", [_document("contracts", "mutual_nda.md")])[0]
    free = ModelInput(tokenizer("Name one planet:", add_special_tokens=False)["input_ids"])
    inputs = [ModelInput(p.token_ids, json_schema=TASKS["extract"].schema_text) for p in reports]
    inputs += [ModelInput(contract.token_ids, json_schema=TASKS["summarize"].schema_text), free]
    # When generated together under their own constraints
    model = small_model_as_worker.model
    outputs = HFGenerator(model, tokenizer, small_model_as_worker.eos_token_ids)(inputs, [ANSWER_TOKENS] * len(inputs),
                                                                                OPTIONS)
    texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    # Then every token of a constrained row is one its own schema allows, and a row ends either as a whole object
    # of its schema or cut at the token limit (the 135M model may loop inside a long string; the worker gives such
    # an answer a second try at twice the room). The free row is unconstrained.
    grammars = GrammarCache(tokenizer, model.get_output_embeddings().out_features)
    for row, (task, output_model) in enumerate((("extract", FinancialReport), ("summarize", ContractSummary))):
        matcher = grammars.matcher(TASKS[task].schema_text)
        assert matcher.consume_tokens(outputs[row]), texts[row]
        whole = matcher.is_accepting() and _valid(output_model, texts[row])
        assert whole or len(outputs[row]) == ANSWER_TOKENS, texts[row]
    assert _valid(FinancialReport, texts[0]), texts[0]
    assert not texts[2].lstrip().startswith("{")
    extract = TASKS["extract"]
    answer = validate_json(extract.schema_text, texts[0], extract.output_model)
    assert answer.keys() == FinancialReport.model_fields.keys()
    # ... written in the schema's own field order (company first), not sorted
    assert list(json.loads(texts[0])) == list(FinancialReport.model_fields)


def test_without_the_constraint_the_same_prompt_leaves_the_schema(small_model_as_worker):
    # The first report, unconstrained: within its first 64 tokens the answer already names fields that
    # FinancialReport does not have (what the constraint prevents; a cut-off answer alone would prove nothing)
    tokenizer = small_model_as_worker.tokenizer
    report = _prompts(tokenizer, "extract", [_document("financials", REPORT)])
    output = HFGenerator(small_model_as_worker.model, tokenizer, small_model_as_worker.eos_token_ids)(report, [PREFIX_TOKENS], OPTIONS)[0]
    text = tokenizer.decode(output, skip_special_tokens=True)
    keys = set(re.findall(r'"(\w+)"\s*:', text))
    assert keys and not keys <= set(FinancialReport.model_fields), text


def test_each_schema_is_compiled_once(small_model):
    cache = GrammarCache(small_model.tokenizer, small_model.model.get_output_embeddings().weight.shape[0])
    first, second = (cache.matcher(TASKS["extract"].schema_text) for _ in range(2))
    assert first is not second and len(cache._compiled) == 1
    with pytest.raises(ValueError, match="cannot compile"):
        cache.matcher(json.dumps({"type": "object", "properties": {"x": {"type": "no-such-type"}}}))


def test_a_cut_off_answer_is_schema_invalid():
    with pytest.raises(DocbatchError) as info:
        validate_json(TASKS["extract"].schema_text, '{"company": "Acme", "report_ty')
    assert info.value.code == ErrorCode.SCHEMA_INVALID


def test_a_built_in_answer_is_also_validated_by_its_pydantic_model():
    extract = TASKS["extract"]
    answer = {**{field: None for field in FinancialReport.model_fields}, "segments": [], "revenue": 1200}
    validated = validate_json(extract.schema_text, json.dumps(answer), extract.output_model)
    assert validated["revenue"] == 1200.0 and isinstance(validated["revenue"], float)  # the model's own JSON form
    assert validate_json(extract.schema_text, json.dumps(answer))["revenue"] == 1200  # a schema alone keeps it
