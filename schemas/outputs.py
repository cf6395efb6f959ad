"""What the two built-in tasks return: pydantic models whose JSON schema also constrains decoding.

Every field is required but nullable: the model must answer each one, with `null` where the document
does not say, never a guess. String and list lengths are bounded so that a constrained answer fits in
its token budget.
"""
from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field



def _text(max_length: int = 300):
    return Field(max_length=max_length)


class Party(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=120)
    role: str | None = Field(max_length=60)


class ContractSummary(BaseModel):
    """`summarize`: a contract's summary and key terms."""

    model_config = ConfigDict(extra="forbid")
    summary: str = Field(max_length=800)
    parties: list[Party] = Field(max_length=8)
    agreement_date: dt.date | None
    effective_date: dt.date | None
    expiration_date: dt.date | None
    term: str | None = _text()
    renewal: str | None = _text()
    payment_terms: str | None = _text()
    termination: str | None = _text()
    governing_law: str | None = Field(max_length=120)
    liability_cap: str | None = _text()
    key_obligations: list[str] = Field(max_length=8)


class Period(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: dt.date | None
    end: dt.date | None
    fiscal_year: int | None


class Segment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=80)
    revenue: float | None


class FinancialReport(BaseModel):
    """`extract`: the key figures of a financial report, as numbers in the stated unit."""

    model_config = ConfigDict(extra="forbid")
    company: str | None = Field(max_length=120)
    report_type: Literal["annual", "quarterly", "half_year", "interim", "other"] | None
    period: Period | None
    currency: str | None = Field(max_length=8, description="ISO 4217 code, e.g. USD")
    unit_scale: Literal["units", "thousands", "millions", "billions"] | None
    revenue: float | None
    cost_of_revenue: float | None
    operating_income: float | None
    net_income: float | None
    eps_basic: float | None
    eps_diluted: float | None
    total_assets: float | None
    total_liabilities: float | None
    equity: float | None
    cash: float | None
    operating_cash_flow: float | None
    capital_expenditure: float | None
    segments: list[Segment] = Field(max_length=12)
