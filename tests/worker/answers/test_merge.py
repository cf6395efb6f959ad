"""Chunk answers merged by rules read from the JSON schema: pure functions, checked without a model."""
from __future__ import annotations

from typing import Any

import pytest

from schemas.outputs import ContractSummary, FinancialReport
from worker.answers.merge import Conflict, Merged, conflict_prompt_text, merge_answers

REPORT = FinancialReport.model_json_schema()
CONTRACT = ContractSummary.model_json_schema()
CUSTOM = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 100},
        "meta": {"type": ["object", "null"],
                 "properties": {"pages": {"type": "integer"}, "draft": {"type": "boolean"}}},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "extra": {},
    },
}
SUMMARY_A = "A five-year lease of the ground floor at 1 Main Street by Acme Corp to Beta LLC."
SUMMARY_B = "Beta LLC pays 10,000 USD a month; either party may end the lease on 90 days' notice."


def report(**fields: Any) -> dict[str, Any]:
    """A valid FinancialReport answer: every field null (segments empty) but those given."""
    blank: dict[str, Any] = {name: None for name in FinancialReport.model_fields} | {"segments": []}
    return FinancialReport.model_validate(blank | fields).model_dump(mode="json")


def contract(**fields: Any) -> dict[str, Any]:
    """A valid ContractSummary answer: a summary, no parties or obligations, every other field null."""
    blank: dict[str, Any] = ({name: None for name in ContractSummary.model_fields}
                             | {"summary": SUMMARY_A, "parties": [], "key_obligations": []})
    return ContractSummary.model_validate(blank | fields).model_dump(mode="json")


def party(name: str, role: str | None = None) -> dict[str, Any]:
    return {"name": name, "role": role}


def test_complementary_chunks_are_combined_without_conflicts():
    merged = merge_answers(REPORT, [report(company="Acme", revenue=1200), report(company="Acme", net_income=300)])
    assert merged == Merged(report(company="Acme", revenue=1200, net_income=300), [])
    assert list(merged.value) == list(REPORT["properties"])
    FinancialReport.model_validate(merged.value)


def test_numbers_that_differ_only_in_type_or_float_noise_agree():
    first, second, third = report(revenue=1200, eps_basic=0.3), report(revenue=1200.0), report(eps_basic=0.1 + 0.2)
    first["revenue"] = 1200  # as a model writes it
    merged = merge_answers(REPORT, [first, second, third])
    assert merged.conflicts == []
    assert merged.value["revenue"] == 1200 and merged.value["eps_basic"] == 0.3


def test_numbers_that_disagree_are_a_conflict_holding_the_first():
    merged = merge_answers(REPORT, [report(revenue=1200), report(), report(revenue=1250), report(revenue=1200.0)])
    assert merged.value == report(revenue=1200)
    assert merged.conflicts == [Conflict("revenue", [1200.0, 1250.0])]


def test_nested_fields_from_different_chunks_fill_one_object():
    merged = merge_answers(REPORT, [
        report(period={"start": "2023-01-01", "end": None, "fiscal_year": None}),
        report(),
        report(period={"start": None, "end": "2023-12-31", "fiscal_year": 2023}),
    ])
    assert merged == Merged(report(period={"start": "2023-01-01", "end": "2023-12-31", "fiscal_year": 2023}), [])


def test_a_nested_disagreement_is_reported_at_its_dotted_path():
    merged = merge_answers(REPORT, [
        report(period={"start": "2023-01-01", "end": "2023-12-31", "fiscal_year": 2023}),
        report(period={"start": "2023-01-01", "end": "2024-03-31", "fiscal_year": 2023}),
    ])
    assert merged.value["period"] == {"start": "2023-01-01", "end": "2023-12-31", "fiscal_year": 2023}
    assert merged.conflicts == [Conflict("period.end", ["2023-12-31", "2024-03-31"])]


def test_segments_with_the_same_name_are_merged_and_disagree_inside():
    merged = merge_answers(REPORT, [
        report(segments=[{"name": "Cloud", "revenue": 500}, {"name": "Devices", "revenue": None}]),
        report(segments=[{"name": " cloud ", "revenue": 520}, {"name": "Services", "revenue": 100},
                         {"name": "DEVICES", "revenue": 300}]),
    ])
    assert merged.value["segments"] == [{"name": "Cloud", "revenue": 500.0}, {"name": "Devices", "revenue": 300.0},
                                        {"name": "Services", "revenue": 100.0}]
    assert merged.conflicts == [Conflict("segments[Cloud].revenue", [500.0, 520.0])]


def test_parties_are_merged_by_name_and_a_role_is_filled_from_another_chunk():
    merged = merge_answers(CONTRACT, [
        contract(parties=[party("Acme Corp")]),
        contract(parties=[party("ACME  corp", "Landlord"), party("Beta LLC", "Tenant")]),
        contract(parties=[party("Beta LLC", "Tenant")]),
    ])
    assert merged == Merged(contract(parties=[party("Acme Corp", "Landlord"), party("Beta LLC", "Tenant")]), [])
    ContractSummary.model_validate(merged.value)


def test_strings_in_a_list_are_deduplicated_keeping_the_first_spelling():
    merged = merge_answers(CONTRACT, [
        contract(key_obligations=["Pay rent monthly", "Maintain insurance"]),
        contract(key_obligations=["pay  rent Monthly", "Return the keys", "Maintain insurance"]),
    ])
    assert merged == Merged(contract(key_obligations=["Pay rent monthly", "Maintain insurance", "Return the keys"]),
                            [])


def test_a_list_over_max_items_is_cut_and_reported_whole():
    names = [f"Party {i}" for i in range(10)]
    merged = merge_answers(CONTRACT, [contract(parties=[party(n) for n in names[:6]]),
                                      contract(parties=[party(n) for n in names[4:]])])
    assert merged.value["parties"] == [party(n) for n in names[:8]]
    assert merged.conflicts == [Conflict("parties", [[party(n) for n in names]])]


def test_the_list_conflict_comes_before_the_conflicts_inside_it():
    segments = [{"name": f"S{i}", "revenue": i} for i in range(13)]
    merged = merge_answers(REPORT, [report(segments=segments[:12]),
                                    report(segments=[{"name": "S0", "revenue": 7}, segments[12]])])
    assert [c.path for c in merged.conflicts] == ["segments", "segments[S0].revenue"]
    assert len(merged.value["segments"]) == 12 and len(merged.conflicts[0].candidates[0]) == 13


def test_one_distinct_summary_is_taken_and_two_are_a_conflict():
    same = merge_answers(CONTRACT, [contract(summary=SUMMARY_A), contract(summary=SUMMARY_A)])
    assert same == Merged(contract(summary=SUMMARY_A), [])
    different = merge_answers(CONTRACT, [contract(summary=SUMMARY_A), contract(summary=SUMMARY_B),
                                         contract(summary=SUMMARY_A)])
    assert different == Merged(contract(summary=SUMMARY_A), [Conflict("summary", [SUMMARY_A, SUMMARY_B])])


def test_fields_null_in_every_chunk_stay_null():
    assert merge_answers(REPORT, [report(), report()]) == Merged(report(), [])
    merged = merge_answers(CUSTOM, [{"title": None, "meta": None, "tags": None}, {}])
    assert merged == Merged({"title": None, "meta": None, "tags": None, "extra": None}, [])


def test_a_single_answer_is_itself():
    answer = report(company="Acme", report_type="annual", currency="USD", unit_scale="millions", revenue=1200.5,
                    period={"start": "2023-01-01", "end": "2023-12-31", "fiscal_year": 2023},
                    segments=[{"name": "Cloud", "revenue": 700.5}, {"name": "Devices", "revenue": 500}])
    assert merge_answers(REPORT, [answer]) == Merged(answer, [])
    terms = contract(parties=[party("Acme Corp", "Landlord"), party("Beta LLC", None)], agreement_date="2024-02-01",
                     governing_law="New York", key_obligations=["Pay rent monthly"])
    assert merge_answers(CONTRACT, [terms]) == Merged(terms, [])


def test_merged_answers_without_conflicts_validate():
    report_merged = merge_answers(REPORT, [
        report(company="Acme", report_type="annual", unit_scale="millions", segments=[{"name": "Cloud", "revenue": 1}]),
        report(company="Acme", currency="EUR", period={"start": None, "end": "2023-12-31", "fiscal_year": None},
               segments=[{"name": "cloud", "revenue": None}, {"name": "Devices", "revenue": 2}]),
    ])
    contract_merged = merge_answers(CONTRACT, [
        contract(parties=[party("Acme Corp")], effective_date="2024-03-01", key_obligations=["Pay rent"]),
        contract(parties=[party("Acme Corp", "Landlord")], term="5 years", key_obligations=["pay rent", "Insure"]),
    ])
    assert report_merged.conflicts == [] and contract_merged.conflicts == []
    assert FinancialReport.model_validate(report_merged.value).model_dump(mode="json") == report_merged.value
    assert ContractSummary.model_validate(contract_merged.value).model_dump(mode="json") == contract_merged.value


def test_a_plain_schema_orders_keys_merges_nested_objects_and_dedupes_strings():
    merged = merge_answers(CUSTOM, [
        {"tags": ["Lease", "NY"], "title": "Lease", "meta": None},
        {"meta": {"pages": 12}, "tags": ["lease", "Commercial"], "extra": {"a": 1, "b": 2}},
        {"title": "Lease", "meta": {"pages": 12.0, "draft": False}, "extra": {"b": 2, "a": 1}},
    ])
    assert merged == Merged({"title": "Lease", "meta": {"pages": 12, "draft": False},
                             "tags": ["Lease", "NY", "Commercial"], "extra": {"a": 1, "b": 2}}, [])
    assert list(merged.value) == ["title", "meta", "tags", "extra"]


def test_a_plain_schema_reports_overflow_and_untyped_disagreement():
    merged = merge_answers(CUSTOM, [{"tags": ["a", "b"], "extra": [1]}, {"tags": ["c", "d"], "extra": [1, 2]}])
    assert merged.value == {"title": None, "meta": None, "tags": ["a", "b", "c"], "extra": [1]}
    assert merged.conflicts == [Conflict("tags", [["a", "b", "c", "d"]]), Conflict("extra", [[1], [1, 2]])]


def test_booleans_are_not_numbers_and_unknown_keys_are_kept_last():
    merged = merge_answers(CUSTOM, [{"meta": {"draft": True}, "note": "x"}, {"meta": {"draft": 1}, "note": "x"}])
    assert merged.value == {"title": None, "meta": {"pages": None, "draft": True}, "tags": None, "extra": None,
                            "note": "x"}
    assert merged.conflicts == [Conflict("meta.draft", [True, 1])]


def test_there_must_be_answers():
    with pytest.raises(ValueError, match="no answers"):
        merge_answers(REPORT, [])


def test_the_conflict_prompt_lists_the_merged_answer_then_each_conflict():
    merged = merge_answers(CUSTOM, [{"title": "Lease", "tags": ["Büro"], "meta": {"pages": 3}},
                                    {"title": "Lease \"A\"", "tags": ["x"], "meta": {"pages": 4}}])
    assert conflict_prompt_text(merged) == (
        'Merged answer:\n'
        '{"title":"Lease","meta":{"pages":3,"draft":null},"tags":["Büro","x"],"extra":null}\n'
        '\n'
        'Conflicting values (choose or combine; keep every stated fact):\n'
        '- title: ["Lease", "Lease \\"A\\""]\n'
        '- meta.pages: [3, 4]'
    )
    assert conflict_prompt_text(merge_answers(CUSTOM, [{"title": "Lease"}])) == (
        'Merged answer:\n{"title":"Lease","meta":null,"tags":null,"extra":null}')
