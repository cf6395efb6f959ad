"""Consistency checks on a validated answer of a built-in task: figures that cannot all be right together.

The schema only says each value is well-formed; these checks say when values contradict each other (a balance
sheet that does not balance, a contract that expires before it starts). They never reject an answer: each finding
becomes a warning stored with the result, for a reader to look at.
"""
from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Any

# Dilution cannot raise a positive EPS; this absorbs rounding of figures reported to the cent.
EPS_ROUNDING = 0.005


@dataclass(frozen=True)
class CheckWarning:
    code: str  # stable snake_case code scripts can match on
    message: str  # a sentence with the figures involved

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, dict) else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _date(value: Any) -> dt.date | None:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        return None


def _fmt(value: float) -> str:
    return repr(round(value, 6))  # rounding hides float noise in sums; repr keeps "1200.0" readable


def _off_by(a: float, b: float, tolerance: float) -> float | None:
    """The relative gap between a and b when it exceeds tolerance (relative to the larger magnitude), else None."""
    scale = max(abs(a), abs(b))
    gap = abs(a - b)
    return gap / scale if gap > tolerance * scale else None


def _balance_sheet(answer: dict[str, Any], tolerance: float) -> list[CheckWarning]:
    assets, liabilities, equity = (_num(_get(answer, k)) for k in ("total_assets", "total_liabilities", "equity"))
    if assets is None or liabilities is None or equity is None:
        return []
    off = _off_by(assets, liabilities + equity, tolerance)
    if off is None:
        return []
    return [CheckWarning("balance_sheet_mismatch",
                         f"total_assets {_fmt(assets)} ≠ total_liabilities {_fmt(liabilities)} + equity "
                         f"{_fmt(equity)} (off by {off:.1%})")]


def _period(answer: dict[str, Any]) -> list[CheckWarning]:
    period = _get(answer, "period")
    start, end = _date(_get(period, "start")), _date(_get(period, "end"))
    fiscal_year = _num(_get(period, "fiscal_year"))
    warnings = []
    if start is not None and end is not None and end <= start:
        warnings.append(CheckWarning("period_order", f"period.end {end} is not after period.start {start}"))
    if fiscal_year is not None and end is not None and fiscal_year not in (end.year, end.year - 1):
        warnings.append(CheckWarning("fiscal_year_mismatch",
                                     f"period.fiscal_year {fiscal_year:.10g} is neither {end.year} nor {end.year - 1} "
                                     f"(period.end {end})"))
    return warnings


def _segments(answer: dict[str, Any], tolerance: float) -> list[CheckWarning]:
    revenue = _num(_get(answer, "revenue"))
    segments = _get(answer, "segments")
    if revenue is None or not isinstance(segments, list) or len(segments) < 2:
        return []
    revenues = [_num(_get(segment, "revenue")) for segment in segments]
    if any(r is None for r in revenues):
        return []
    total = sum(revenues)
    off = _off_by(total, revenue, tolerance)
    if off is None:
        return []
    return [CheckWarning("segments_sum_mismatch",
                         f"the {len(segments)} segment revenues sum to {_fmt(total)} ≠ revenue {_fmt(revenue)} "
                         f"(off by {off:.1%})")]


def _operating_income(answer: dict[str, Any], tolerance: float) -> list[CheckWarning]:
    revenue, cost, operating = (_num(_get(answer, k)) for k in ("revenue", "cost_of_revenue", "operating_income"))
    if revenue is None or cost is None or operating is None:
        return []
    gross = revenue - cost
    if operating <= gross + tolerance * abs(revenue):
        return []
    return [CheckWarning("operating_above_gross",
                         f"operating_income {_fmt(operating)} > gross profit {_fmt(gross)} "
                         f"(revenue {_fmt(revenue)} − cost_of_revenue {_fmt(cost)})")]


def _eps(answer: dict[str, Any]) -> list[CheckWarning]:
    basic, diluted, net_income = (_num(_get(answer, k)) for k in ("eps_basic", "eps_diluted", "net_income"))
    warnings = []
    if basic is not None and diluted is not None and basic > 0 and diluted > basic + EPS_ROUNDING:
        warnings.append(CheckWarning("eps_diluted_above_basic",
                                     f"eps_diluted {_fmt(diluted)} > eps_basic {_fmt(basic)}: "
                                     f"dilution cannot raise a positive EPS"))
    if basic is not None and net_income is not None and basic * net_income < 0:
        warnings.append(CheckWarning("eps_sign",
                                     f"net_income {_fmt(net_income)} and eps_basic {_fmt(basic)} "
                                     f"have opposite signs"))
    return warnings


def _currency(answer: dict[str, Any]) -> list[CheckWarning]:
    currency = _get(answer, "currency")
    if currency is None or (isinstance(currency, str) and re.fullmatch(r"[A-Z]{3}", currency)):
        return []
    return [CheckWarning("currency_code", f"currency {currency!r} is not a three-letter ISO 4217 code")]


def _date_order(answer: dict[str, Any]) -> list[CheckWarning]:
    expiration = _date(_get(answer, "expiration_date"))
    start_field = "effective_date" if _date(_get(answer, "effective_date")) is not None else "agreement_date"
    start = _date(_get(answer, start_field))
    if expiration is None or start is None or expiration > start:
        return []
    return [CheckWarning("date_order", f"expiration_date {expiration} is not after {start_field} {start}")]


def _parties(answer: dict[str, Any]) -> list[CheckWarning]:
    parties = _get(answer, "parties")
    if not isinstance(parties, list):
        return []
    if not parties:
        return [CheckWarning("no_parties", "no parties are named")]
    by_key: dict[str, list[str]] = {}
    for party in parties:
        name = _get(party, "name")
        if isinstance(name, str):
            by_key.setdefault(" ".join(name.split()).casefold(), []).append(name)
    return [CheckWarning("duplicate_party",
                         f"{len(names)} parties are named {names[0]!r} (ignoring case and spacing): "
                         f"{', '.join(repr(n) for n in names)}")
            for names in by_key.values() if len(names) > 1]


def check_answer(task: str, answer: dict[str, Any], *, tolerance: float = 0.01) -> list[CheckWarning]:
    """The warnings for a built-in task's answer (its JSON-mode dict), in check order; [] for other tasks.

    A check runs only when the values it needs are present; missing keys or values of the wrong type count as
    absent, so odd input yields fewer warnings, never an exception. `tolerance` is a fraction of the figures compared.
    """
    if not isinstance(answer, dict):
        return []
    if task == "extract":
        return [*_balance_sheet(answer, tolerance), *_period(answer), *_segments(answer, tolerance),
                *_operating_income(answer, tolerance), *_eps(answer), *_currency(answer)]
    if task == "summarize":
        return [*_date_order(answer), *_parties(answer)]
    return []


def result_warnings(checks: str | None, answer: Any) -> dict[str, Any]:
    """A document's final answer's consistency checks (a task's `checks`, None for none), as its result's
    `warnings` entry."""
    if checks is None:
        return {}
    return {"warnings": [warning.as_dict() for warning in check_answer(checks, answer)]}
