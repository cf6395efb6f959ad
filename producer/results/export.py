"""`docbatch results`: one record per job of a batch, as JSON lines, CSV, a Markdown report, or an
OpenAI Batch output file."""
from __future__ import annotations

import csv
import io
import json
from typing import Iterable

from producer.intake.openai_batch import render_openai
from producer.results.report import render_markdown
from schemas.records import JobRecord
from schemas.sql.models import Batch
from schemas.sql.store import Store

FORMATS = ("jsonl", "csv", "md", "openai")


def batch_records(store: Store, batch_id: str) -> list[JobRecord]:
    """Every job of the batch, then every input it rejected at submit, each in name order."""
    batch = store.get_batch(batch_id)
    return ([JobRecord.from_row(*row) for row in store.batch_rows(batch_id)]
            + [JobRecord.from_reject(reject, batch.task, batch.model) for reject in store.batch_rejects(batch_id)])


def render(records: Iterable[JobRecord], fmt: str, *, title: str = "docbatch results",
           batch: Batch | None = None) -> str:
    """The records as `jsonl` (one JSON object a line), `csv` (the result as a JSON string column), `md`
    (a readable report per document, naming `batch`'s model and task definition) or `openai` (the OpenAI Batch
    output format)."""
    if fmt == "jsonl":
        return "".join(record.model_dump_json() + "\n" for record in records)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(JobRecord.model_fields))
        writer.writeheader()
        for record in records:
            row = record.model_dump(mode="json")
            row["result"] = json.dumps(row["result"], ensure_ascii=False) if row["result"] is not None else ""
            writer.writerow(row)
        return buffer.getvalue()
    if fmt == "md":
        return render_markdown(list(records), title=title, batch=batch)
    if fmt == "openai":
        return render_openai(records)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
