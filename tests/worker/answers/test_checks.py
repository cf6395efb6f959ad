"""Consistency checks on validated answers: each fires on its own violation, with the figures, and only then."""
from __future__ import annotations

from typing import Any

import pytest

from schemas.outputs import ContractSummary, FinancialReport
from worker.answers.checks import CheckWarning, check_answer


def report(**changes: Any) -> dict[str, Any]:
    """A consistent annual report, with `changes` applied (a `period` dict merges), as the worker stores it."""
    period = changes.pop("period", {})
    if period is not None:
        period = {"start": "2023-01-01", "end": "2023-12-31", "fiscal_year": 2023, **period}
    answer = {"company": "Acme Corp", "report_type": "annual", "period": period, "currency": "USD",
              "unit_scale": "millions", "revenue": 1000, "cost_of_revenue": 600, "operating_income": 250,
              "net_income": 180, "eps_basic": 1.8, "eps_diluted": 1.75, "total_assets": 1200,
              "total_liabilities": 700, "equity": 500, "cash": 150, "operating_cash_flow": 220,
              "capital_expenditure": 80,
              "segments": [{"name": "Products", "revenue": 700}, {"name": "Services", "revenue": 300}]}
    return FinancialReport.model_validate({**answer, **changes}).model_dump(mode="json")


def contract(**changes: Any) -> dict[str, Any]:
    answer = {"summary": "Acme supplies widgets to Globex for three years.",
              "parties": [{"name": "Acme Corp", "role": "Supplier"}, {"name": "Globex Ltd", "role": "Customer"}],
              "agreement_date": "2023-01-15", "effective_date": "2023-02-01", "expiration_date": "2026-01-31",
              "term": "3 years", "renewal": None, "payment_terms": "Net 30", "termination": None,
              "governing_law": "New York", "liability_cap": None, "key_obligations": ["Deliver monthly"]}
    return ContractSummary.model_validate({**answer, **changes}).model_dump(mode="json")


def test_consistent_answers_give_no_warnings():
    assert check_answer("extract", report()) == []
    assert check_answer("summarize", contract()) == []


@pytest.mark.parametrize(("changes", "code", "message"), [
    ({"equity": 400}, "balance_sheet_mismatch",
     "total_assets 1200.0 ≠ total_liabilities 700.0 + equity 400.0 (off by 8.3%)"),
    ({"period": {"start": "2023-12-31", "end": "2023-01-01"}}, "period_order",
     "period.end 2023-01-01 is not after period.start 2023-12-31"),
    ({"period": {"start": "2023-06-30", "end": "2023-06-30"}}, "period_order",
     "period.end 2023-06-30 is not after period.start 2023-06-30"),
    ({"period": {"fiscal_year": 2021}}, "fiscal_year_mismatch",
     "period.fiscal_year 2021 is neither 2023 nor 2022 (period.end 2023-12-31)"),
    ({"period": {"fiscal_year": 2024}}, "fiscal_year_mismatch",
     "period.fiscal_year 2024 is neither 2023 nor 2022 (period.end 2023-12-31)"),
    ({"segments": [{"name": "Products", "revenue": 700}, {"name": "Services", "revenue": 250}]},
     "segments_sum_mismatch", "the 2 segment revenues sum to 950.0 ≠ revenue 1000.0 (off by 5.0%)"),
    ({"operating_income": 450}, "operating_above_gross",
     "operating_income 450.0 > gross profit 400.0 (revenue 1000.0 − cost_of_revenue 600.0)"),
    ({"eps_diluted": 1.9}, "eps_diluted_above_basic",
     "eps_diluted 1.9 > eps_basic 1.8: dilution cannot raise a positive EPS"),
    ({"net_income": -180}, "eps_sign", "net_income -180.0 and eps_basic 1.8 have opposite signs"),
    ({"currency": "usd"}, "currency_code", "currency 'usd' is not a three-letter ISO 4217 code"),
    ({"currency": "US$"}, "currency_code", "currency 'US$' is not a three-letter ISO 4217 code"),
    ({"currency": "EURO"}, "currency_code", "currency 'EURO' is not a three-letter ISO 4217 code"),
    ({"currency": "ÉUR"}, "currency_code", "currency 'ÉUR' is not a three-letter ISO 4217 code"),
])
def test_each_report_check_fires_alone_on_its_violation(changes, code, message):
    assert check_answer("extract", report(**changes)) == [CheckWarning(code, message)]


@pytest.mark.parametrize(("changes", "code", "message"), [
    ({"expiration_date": "2023-01-31"}, "date_order",
     "expiration_date 2023-01-31 is not after effective_date 2023-02-01"),
    ({"expiration_date": "2023-02-01"}, "date_order",
     "expiration_date 2023-02-01 is not after effective_date 2023-02-01"),
    ({"effective_date": None, "expiration_date": "2023-01-10"}, "date_order",
     "expiration_date 2023-01-10 is not after agreement_date 2023-01-15"),
    ({"parties": []}, "no_parties", "no parties are named"),
    ({"parties": [{"name": "Acme Corp", "role": "Supplier"}, {"name": "Globex Ltd", "role": "Customer"},
                  {"name": " ACME   corp ", "role": None}]}, "duplicate_party",
     "2 parties are named 'Acme Corp' (ignoring case and spacing): 'Acme Corp', ' ACME   corp '"),
])
def test_each_contract_check_fires_alone_on_its_violation(changes, code, message):
    assert check_answer("summarize", contract(**changes)) == [CheckWarning(code, message)]


def test_an_expiration_after_the_effective_date_passes_even_when_before_the_agreement_date():
    assert check_answer("summarize", contract(agreement_date="2023-03-01", expiration_date="2023-02-15")) == []


def test_several_violations_are_all_reported_in_check_order():
    codes = [w.code for w in check_answer("extract", report(equity=400, currency="usd", net_income=-1))]
    assert codes == ["balance_sheet_mismatch", "eps_sign", "currency_code"]


@pytest.mark.parametrize(("changes", "fires"), [
    # assets 1000 against liabilities + equity: 1% of the larger side is 10
    ({"total_assets": 1000, "total_liabilities": 600, "equity": 391}, False),
    ({"total_assets": 1000, "total_liabilities": 600, "equity": 390}, False),
    ({"total_assets": 1000, "total_liabilities": 600, "equity": 389}, True),
    ({"total_assets": 990, "total_liabilities": 600, "equity": 400}, False),
    ({"total_assets": 989, "total_liabilities": 600, "equity": 400}, True),
])
def test_balance_sheet_tolerance_boundary(changes, fires):
    assert [w.code for w in check_answer("extract", report(**changes))] == (["balance_sheet_mismatch"] if fires else [])


@pytest.mark.parametrize(("services", "fires"), [(291, False), (290, False), (289, True), (310, False), (311, True)])
def test_segment_sum_tolerance_boundary(services, fires):
    segments = [{"name": "Products", "revenue": 700}, {"name": "Services", "revenue": services}]
    expected = ["segments_sum_mismatch"] if fires else []
    assert [w.code for w in check_answer("extract", report(segments=segments))] == expected


@pytest.mark.parametrize(("operating_income", "fires"), [(400, False), (410, False), (411, True)])
def test_operating_income_tolerance_is_relative_to_revenue(operating_income, fires):
    expected = ["operating_above_gross"] if fires else []
    assert [w.code for w in check_answer("extract", report(operating_income=operating_income))] == expected


@pytest.mark.parametrize(("eps_diluted", "fires"), [(1.8, False), (1.804, False), (1.81, True)])
def test_diluted_eps_allows_a_rounding_cent(eps_diluted, fires):
    expected = ["eps_diluted_above_basic"] if fires else []
    assert [w.code for w in check_answer("extract", report(eps_diluted=eps_diluted))] == expected


def test_custom_tolerance():
    answer = report(equity=400)  # off by 8.3%
    assert check_answer("extract", answer, tolerance=0.1) == []
    assert [w.code for w in check_answer("extract", answer, tolerance=0.05)] == ["balance_sheet_mismatch"]


@pytest.mark.parametrize("changes", [
    {"equity": None, "total_assets": 5000},
    {"total_liabilities": None, "total_assets": 5000},
    {"period": {"start": None, "end": "2023-01-01", "fiscal_year": 2023}},
    {"period": {"end": None, "fiscal_year": 1999}},
    {"period": {"fiscal_year": None}},
    {"period": None},
    {"revenue": None, "operating_income": 5000},
    {"segments": [{"name": "Products", "revenue": 700}, {"name": "Services", "revenue": None}]},
    {"segments": [{"name": "Products", "revenue": 10}]},
    {"cost_of_revenue": None, "operating_income": 5000},
    {"eps_basic": None, "net_income": -180},
    {"eps_basic": -0.5, "eps_diluted": -0.4, "net_income": -50},  # dilution check only for positive EPS
    {"eps_basic": 0, "eps_diluted": 0, "net_income": -50},
    {"net_income": 0, "eps_basic": -0.1, "eps_diluted": -0.1},
    {"currency": None},
])
def test_checks_skip_when_their_values_are_missing(changes):
    assert check_answer("extract", report(**changes)) == []


def test_missing_contract_values_skip_checks():
    assert check_answer("summarize", contract(expiration_date=None)) == []
    no_start = contract(effective_date=None, agreement_date=None, expiration_date="2000-01-01")
    assert check_answer("summarize", no_start) == []


def test_an_all_null_report_gives_no_warnings():
    nulls = {name: None for name in FinancialReport.model_fields if name != "segments"}
    assert check_answer("extract", report(**nulls, segments=[])) == []


@pytest.mark.parametrize("answer", [
    {},
    {"total_assets": "lots", "total_liabilities": 1, "equity": True},
    {"period": ["2023-01-01"], "segments": "many", "revenue": float("nan")},
    {"period": {"start": "yesterday", "end": 20231231, "fiscal_year": "2023"}},
    {"segments": [None, 3], "revenue": 10},
    {"parties": [None, "Acme", {"name": 7}]},
    {"parties": None, "expiration_date": "2023-02-30", "effective_date": "2023-01-01"},
])
def test_odd_input_never_raises(answer):
    assert check_answer("extract", answer) == []
    assert check_answer("summarize", answer) == []


def test_a_present_currency_that_is_not_a_string_is_flagged():
    assert check_answer("extract", {"currency": 840}) == [
        CheckWarning("currency_code", "currency 840 is not a three-letter ISO 4217 code")]


def test_other_tasks_are_not_checked():
    assert check_answer("classify", report(equity=1)) == []
    assert check_answer("summarise", contract(parties=[])) == []


def test_as_dict_is_what_the_result_stores():
    (warning,) = check_answer("summarize", contract(parties=[]))
    assert warning.as_dict() == {"code": "no_parties", "message": "no parties are named"}
