"""The Markdown report: the model and task definition that answered; exact lines for contracts, financial reports,
other tasks, failures and warnings."""
from __future__ import annotations

from typing import Any

from producer.results.report import render_markdown
from schemas.outputs import ContractSummary, FinancialReport
from schemas.records import JobRecord
from schemas.settings import PACKAGED_MODEL, REAL_MODEL_COMMAND, model_caveat
from schemas.sql.models import Batch
from schemas.states import JobState


def contract(**changes: Any) -> dict[str, Any]:
    answer = {"summary": "Acme supplies widgets to Globex for three years.",
              "parties": [{"name": "Acme Corp", "role": "Supplier"}, {"name": "Globex Ltd", "role": None}],
              "agreement_date": "2023-01-15", "effective_date": None, "expiration_date": "2026-01-31",
              "term": "3 years", "renewal": "Automatic | yearly", "payment_terms": "Net 30\nby wire",
              "termination": None, "governing_law": "New York", "liability_cap": None,
              "key_obligations": ["Deliver monthly", "Keep records"]}
    return ContractSummary.model_validate({**answer, **changes}).model_dump(mode="json")


def financials(**changes: Any) -> dict[str, Any]:
    answer = {"company": "Acme Corp", "report_type": "half_year",
              "period": {"start": "2023-01-01", "end": "2023-06-30", "fiscal_year": 2023}, "currency": "USD",
              "unit_scale": "thousands", "revenue": 1234567, "cost_of_revenue": 734567.5, "operating_income": -2500,
              "net_income": 180000, "eps_basic": 1.8, "eps_diluted": 1.756, "total_assets": 1200000,
              "total_liabilities": 700000, "equity": 500000, "cash": None, "operating_cash_flow": 0,
              "capital_expenditure": 80000,
              "segments": [{"name": "Products | EU", "revenue": 1000000}, {"name": "Services", "revenue": None}]}
    return FinancialReport.model_validate({**answer, **changes}).model_dump(mode="json")


def done(name: str, task: str, answer: dict[str, Any] | None = None, **result: Any) -> JobRecord:
    data = {"json": answer, **result} if answer is not None else result
    return JobRecord(job_id=f"job-{name}", name=name, sha256="ab" * 32, task=task, state=JobState.DONE,
                     result={"input_truncated": False, **data}, worker="worker-1", tokens_in=1200, tokens_out=345)


def section(md: str, name: str) -> list[str]:
    """The lines of one record's section, so an assertion cannot be satisfied by another record."""
    lines = md.splitlines()
    start = lines.index(f"## {name}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_title_and_summary_line():
    records = [done("a.pdf", "summarize", contract()),
               done("b.pdf", "extract", financials(), warnings=[{"code": "eps_sign", "message": "opposite"}]),
               JobRecord(job_id=None, name="c.bin", sha256=None, task="extract", state=JobState.FAILED,
                         error_code="unsupported_type", error_message="not a document")]
    lines = render_markdown(records, title="Batch 1f2e").splitlines()
    assert lines[:3] == ["# Batch 1f2e", "", "3 documents: 2 done, 1 failed; 1 with warnings."]
    assert [line for line in lines if line.startswith("## ")] == ["## a.pdf", "## b.pdf", "## c.bin"]


def test_unfinished_and_cancelled_jobs_are_counted_and_not_called_failed():
    records = [JobRecord(job_id="j1", name="a.pdf", sha256="x", task="extract", state=JobState.RUNNING),
               JobRecord(job_id="j2", name="b.pdf", sha256="x", task="extract", state=JobState.CANCELLED)]
    md = render_markdown(records, title="t")
    assert "2 documents: 0 done, 0 failed, 1 cancelled, 1 not finished; 0 with warnings." in md.splitlines()
    assert "**Not finished**: `running`" in section(md, "a.pdf")
    assert "**Cancelled**" in section(md, "b.pdf")


def test_contract_section():
    lines = section(render_markdown([done("nda/acme.pdf", "summarize", contract())], title="t"), "nda/acme.pdf")
    assert lines[2] == "Acme supplies widgets to Globex for three years."
    parties = lines.index("### Parties")
    assert lines[parties + 2:parties + 4] == ["- Acme Corp — Supplier", "- Globex Ltd"]
    terms = lines.index("### Key terms")
    assert lines[terms + 2:terms + 13] == [
        "| Key term | Value |",
        "|---|---|",
        "| Agreement date | 2023-01-15 |",
        "| Effective date | — |",
        "| Expiration date | 2026-01-31 |",
        "| Term | 3 years |",
        r"| Renewal | Automatic \| yearly |",
        "| Payment terms | Net 30<br>by wire |",
        "| Termination | — |",
        "| Governing law | New York |",
        "| Liability cap | — |",
    ]
    obligations = lines.index("### Key obligations")
    assert lines[obligations + 2:obligations + 4] == ["- Deliver monthly", "- Keep records"]
    assert lines[-1] == "<sub>job job-nda/acme.pdf · worker worker-1 · tokens 1,200 in / 345 out</sub>"
    assert not any("Warnings" in line or "**Note**" in line for line in lines)


def test_contract_without_obligations_or_parties():
    md = render_markdown([done("x.pdf", "summarize", contract(key_obligations=[], parties=[]))], title="t")
    lines = section(md, "x.pdf")
    assert "### Key obligations" not in lines
    assert lines[lines.index("### Parties") + 2] == "None named."


def test_financial_report_section():
    lines = section(render_markdown([done("q2.pdf", "extract", financials())], title="t"), "q2.pdf")
    assert lines[2] == ("**Company**: Acme Corp · **Report**: half year · **Period**: 2023-01-01 – 2023-06-30, "
                        "FY 2023 · **Currency**: USD · **Unit**: thousands")
    figures = lines.index("### Figures")
    assert lines[figures + 2:figures + 16] == [
        "| Figure | Value |",
        "|---|--:|",
        "| Revenue | 1,234,567 |",
        "| Cost of revenue | 734,567.5 |",
        "| Operating income | -2,500 |",
        "| Net income | 180,000 |",
        "| EPS basic | 1.80 |",
        "| EPS diluted | 1.76 |",
        "| Total assets | 1,200,000 |",
        "| Total liabilities | 700,000 |",
        "| Equity | 500,000 |",
        "| Cash | — |",
        "| Operating cash flow | 0 |",
        "| Capital expenditure | 80,000 |",
    ]
    segments = lines.index("### Segments")
    assert lines[segments + 2:segments + 6] == ["| Segment | Revenue |", "|---|--:|",
                                                r"| Products \| EU | 1,000,000 |", "| Services | — |"]


def test_financial_report_with_nulls_and_no_segments():
    nulls = {name: None for name in FinancialReport.model_fields if name != "segments"}
    lines = section(render_markdown([done("x.pdf", "extract", financials(**nulls, segments=[]))], title="t"), "x.pdf")
    assert lines[2] == "**Company**: — · **Report**: — · **Period**: — · **Currency**: — · **Unit**: —"
    assert "| Revenue | — |" in lines and "| EPS diluted | — |" in lines
    assert "### Segments" not in lines


def test_period_with_only_an_end_date():
    answer = financials(period={"start": None, "end": "2023-12-31", "fiscal_year": None})
    lines = section(render_markdown([done("x.pdf", "extract", answer)], title="t"), "x.pdf")
    assert "**Period**: — – 2023-12-31 ·" in lines[2]


def test_failed_job_line():
    record = JobRecord(job_id="j9", name="scan.pdf", sha256="x", task="extract", state=JobState.FAILED,
                       error_code="schema_invalid", error_message="the answer is not valid\n(3 errors)",
                       worker="worker-2", tokens_in=900, tokens_out=None)
    lines = section(render_markdown([record], title="t"), "scan.pdf")
    assert lines == ["## scan.pdf", "", "**Failed**: `schema_invalid` — the answer is not valid (3 errors)", "",
                     "<sub>job j9 · worker worker-2 · tokens 900 in / — out</sub>"]


def test_rejected_path_has_no_metadata_line():
    record = JobRecord(job_id=None, name="huge.bin", sha256=None, task="extract", state=JobState.FAILED,
                       error_code="file_too_large", error_message="2.1 GB over the 1 GB limit")
    assert section(render_markdown([record], title="t"), "huge.bin") == [
        "## huge.bin", "", "**Failed**: `file_too_large` — 2.1 GB over the 1 GB limit"]


def test_warnings_and_truncation_are_shown():
    warnings = [{"code": "balance_sheet_mismatch",
                 "message": "total_assets 1200.0 ≠ total_liabilities 700.0 + equity 400.0 (off by 8.3%)"},
                {"code": "currency_code", "message": "currency 'usd' is not a three-letter ISO 4217 code"}]
    record = done("x.pdf", "extract", financials(), input_truncated=True, warnings=warnings)
    lines = section(render_markdown([record], title="t"), "x.pdf")
    assert "**Note**: the input was cut to fit the model; the rest of the document was not read." in lines
    start = lines.index("### Warnings")
    assert lines[start + 2:start + 4] == [
        "- `balance_sheet_mismatch`: total_assets 1200.0 ≠ total_liabilities 700.0 + equity 400.0 (off by 8.3%)",
        "- `currency_code`: currency 'usd' is not a three-letter ISO 4217 code"]


def test_warnings_on_a_custom_task_are_shown_too():
    lines = section(render_markdown([done("x.txt", "classify", {"label": "nda"},
                                          warnings=[{"code": "low_confidence", "message": "0.4"}])], title="t"),
                    "x.txt")
    assert "- `low_confidence`: 0.4" in lines


def test_custom_task_json_is_a_json_block():
    lines = section(render_markdown([done("x.txt", "classify", {"label": "nda", "score": 0.9})], title="t"), "x.txt")
    assert lines[2:8] == ["```json", "{", '  "label": "nda",', '  "score": 0.9', "}", "```"]


def test_custom_task_text_is_a_fence_longer_than_any_backticks_inside():
    lines = section(render_markdown([done("x.txt", "freeform", text="Use ``` for code.\nDone.")], title="t"), "x.txt")
    assert lines[2:6] == ["````", "Use ``` for code.", "Done.", "````"]


def test_built_in_task_with_a_text_result_falls_back_to_the_text():
    lines = section(render_markdown([done("x.pdf", "summarize", text="plain answer")], title="t"), "x.pdf")
    assert lines[2:5] == ["```", "plain answer", "```"]


def test_no_records():
    assert render_markdown([], title="Empty") == "# Empty\n\n0 documents: 0 done, 0 failed; 0 with warnings.\n"


def test_the_report_names_the_model_and_the_task_definition_and_what_the_packaged_models_answers_prove():
    records = [done("a.pdf", "summarize", contract())]
    packaged = Batch(id="b1", task="summarize", task_hash="c0ffee" * 10 + "abcd", model=PACKAGED_MODEL)
    lines = render_markdown(records, title="Batch b1", batch=packaged).splitlines()
    assert lines[:5] == ["# Batch b1", "", f"Model `smollm2-135m`; task `summarize`, definition `{'c0ffee' * 10}abcd`.",
                         "", f"> {model_caveat(PACKAGED_MODEL)}"]
    assert "is a placeholder: its answers prove that the pipeline runs, not answer quality" in lines[4]
    assert REAL_MODEL_COMMAND in lines[4]
    assert lines[6] == "1 document: 1 done, 0 failed; 0 with warnings."
    # A real model's report has no such note
    real = Batch(id="b2", task="extract", task_hash=None, model="Qwen/Qwen2.5-7B-Instruct")
    assert render_markdown(records, title="Batch b2", batch=real).splitlines()[:5] == [
        "# Batch b2", "", "Model `Qwen/Qwen2.5-7B-Instruct`; task `extract`.", "",
        "1 document: 1 done, 0 failed; 0 with warnings."]
