"""`docbatch results --format md`: a batch's records as a Markdown report for a legal or finance reader.

One section per document: a contract's summary and key terms, a financial report's figures, any other task's
answer as-is, or why the job failed. Truncated inputs and consistency warnings are always shown.
"""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from schemas.records import JobRecord
from schemas.settings import model_caveat
from schemas.states import JobState

if TYPE_CHECKING:
    from schemas.sql.models import Batch

NULL = "—"

CONTRACT_TERMS = (("Agreement date", "agreement_date"), ("Effective date", "effective_date"),
                  ("Expiration date", "expiration_date"), ("Term", "term"), ("Renewal", "renewal"),
                  ("Payment terms", "payment_terms"), ("Termination", "termination"),
                  ("Governing law", "governing_law"), ("Liability cap", "liability_cap"))

FIGURES = (("Revenue", "revenue"), ("Cost of revenue", "cost_of_revenue"), ("Operating income", "operating_income"),
           ("Net income", "net_income"), ("EPS basic", "eps_basic"), ("EPS diluted", "eps_diluted"),
           ("Total assets", "total_assets"), ("Total liabilities", "total_liabilities"), ("Equity", "equity"),
           ("Cash", "cash"), ("Operating cash flow", "operating_cash_flow"),
           ("Capital expenditure", "capital_expenditure"))
PER_SHARE = {"eps_basic", "eps_diluted"}


def _inline(value: Any) -> str:
    """A value on one line: a newline in model text must not end a list item or start a heading."""
    return NULL if value is None else " ".join(str(value).split())


def _cell(value: Any) -> str:
    if value is None:
        return NULL
    return re.sub(r"\r\n|\r|\n", "<br>", str(value)).replace("|", r"\|")


def _table(header: tuple[str, str], rows: list[tuple[Any, Any]], align: str = "---") -> str:
    lines = [f"| {header[0]} | {header[1]} |", f"|---|{align}|"]
    lines += [f"| {_cell(label)} | {_cell(value)} |" for label, value in rows]
    return "\n".join(lines)


def _number(value: Any, decimals: int | None = None) -> str | None:
    """Thousands separators; `decimals` fixed (EPS) or as many as the figure has, up to 6."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if decimals is not None:
        return f"{value:,.{decimals}f}"
    text = f"{value:,.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _fenced(text: str, language: str = "") -> str:
    fence = "`" * max(3, max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _contract(answer: dict[str, Any]) -> list[str]:
    blocks = [_inline(answer.get("summary"))]
    parties = [p for p in answer.get("parties") or [] if isinstance(p, dict)]
    party_lines = [f"- {_inline(p.get('name'))}" + (f" — {_inline(p['role'])}" if p.get("role") else "")
                   for p in parties]
    blocks += ["### Parties", "\n".join(party_lines) or "None named."]
    terms = [(label, answer.get(key)) for label, key in CONTRACT_TERMS]
    blocks += ["### Key terms", _table(("Key term", "Value"), terms)]
    if obligations := answer.get("key_obligations"):
        blocks += ["### Key obligations", "\n".join(f"- {_inline(item)}" for item in obligations)]
    return blocks


def _period(period: Any) -> str:
    if not isinstance(period, dict):
        return NULL
    parts = []
    if period.get("start") or period.get("end"):
        parts.append(f"{period.get('start') or NULL} – {period.get('end') or NULL}")
    if period.get("fiscal_year") is not None:
        parts.append(f"FY {period['fiscal_year']}")
    return ", ".join(parts) or NULL


def _financials(answer: dict[str, Any]) -> list[str]:
    report_type = answer.get("report_type")
    facts = [("Company", _inline(answer.get("company"))),
             ("Report", _inline(report_type.replace("_", " ") if isinstance(report_type, str) else report_type)),
             ("Period", _period(answer.get("period"))), ("Currency", _inline(answer.get("currency"))),
             ("Unit", _inline(answer.get("unit_scale")))]
    blocks = [" · ".join(f"**{label}**: {value}" for label, value in facts)]
    rows = [(label, _number(answer.get(key), 2 if key in PER_SHARE else None)) for label, key in FIGURES]
    blocks += ["### Figures", _table(("Figure", "Value"), rows, align="--:")]
    segments = [s for s in answer.get("segments") or [] if isinstance(s, dict)]
    if segments:
        rows = [(s.get("name"), _number(s.get("revenue"))) for s in segments]
        blocks += ["### Segments", _table(("Segment", "Revenue"), rows, align="--:")]
    return blocks


def _answer(task: str, result: dict[str, Any]) -> list[str]:
    answer = result.get("json")
    if task == "summarize" and isinstance(answer, dict):
        return _contract(answer)
    if task == "extract" and isinstance(answer, dict):
        return _financials(answer)
    if "json" in result:
        return [_fenced(json.dumps(answer, indent=2, ensure_ascii=False), "json")]
    if isinstance(result.get("text"), str):
        return [_fenced(result["text"])]
    return ["_No answer stored._"]


def _result(record: JobRecord) -> dict[str, Any]:
    return (record.result or {}) if record.state == JobState.DONE else {}


def _outcome(record: JobRecord) -> list[str]:
    if record.state == JobState.DONE:
        return _answer(record.task, _result(record))
    if record.state in (JobState.FAILED, JobState.CANCELLED):
        code = f"`{record.error_code}`" if record.error_code else None
        message = _inline(record.error_message) if record.error_message else None
        detail = " — ".join(part for part in (code, message) if part)
        label = "Failed" if record.state == JobState.FAILED else "Cancelled"
        return [f"**{label}**: {detail}" if detail else f"**{label}**"]
    return [f"**Not finished**: `{record.state.value}`"]


def _warnings(result: dict[str, Any]) -> list[str]:
    warnings = result.get("warnings") or []
    if not warnings:
        return []
    lines = [f"- `{_inline(w.get('code'))}`: {_inline(w.get('message'))}" if isinstance(w, dict)
             else f"- {_inline(w)}" for w in warnings]
    return ["### Warnings", "\n".join(lines)]


def _metadata(record: JobRecord) -> list[str]:
    parts = [f"job {record.job_id}" if record.job_id else None, f"worker {record.worker}" if record.worker else None]
    if record.tokens_in is not None or record.tokens_out is not None:
        parts.append(f"tokens {_number(record.tokens_in) or NULL} in / {_number(record.tokens_out) or NULL} out")
    text = " · ".join(part for part in parts if part)
    return [f"<sub>{text}</sub>"] if text else []


def _section(record: JobRecord) -> str:
    result = _result(record)
    blocks = [f"## {_inline(record.name)}", *_outcome(record)]
    if result.get("input_truncated"):
        blocks.append("**Note**: the input was cut to fit the model; the rest of the document was not read.")
    blocks += [*_warnings(result), *_metadata(record)]
    return "\n\n".join(blocks)


def _summary(records: list[JobRecord]) -> str:
    counts: dict[str, int] = {}
    for record in records:
        key = record.state.value if record.state.is_terminal else "not finished"
        counts[key] = counts.get(key, 0) + 1
    states = [f"{counts.get('done', 0)} done", f"{counts.get('failed', 0)} failed"]
    states += [f"{counts[key]} {key}" for key in ("cancelled", "not finished") if key in counts]
    warned = sum(1 for record in records if _result(record).get("warnings"))
    documents = "document" if len(records) == 1 else "documents"
    return f"{len(records)} {documents}: {', '.join(states)}; {warned} with warnings."


def _answered_by(model: str, task: str, task_hash: str | None) -> list[str]:
    """Which model answered which task definition, and, for the packaged model, what its answers are worth."""
    definition = f", definition `{task_hash}`" if task_hash else ""
    caveat = model_caveat(model)
    return [f"Model `{_inline(model)}`; task `{_inline(task)}`{definition}.", *([f"> {caveat}"] if caveat else [])]


def render_markdown(records: list[JobRecord], *, title: str, batch: Batch | None = None) -> str:
    """The report: `# title`, the model and task definition of `batch` (when given), a one-line summary of
    outcomes, then one section per record in the given order."""
    about = _answered_by(batch.model, batch.task, batch.task_hash) if batch is not None else []
    return "\n\n".join([f"# {_inline(title)}", *about, _summary(records), *map(_section, records)]) + "\n"
