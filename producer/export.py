"""`docbatch results`: one record per job of a batch, as JSON lines or CSV."""
from __future__ import annotations

import csv
import io
import json
from typing import Iterable

from schemas.records import JobRecord
from schemas.store import Store

FORMATS = ("jsonl", "csv")


def batch_records(store: Store, batch_id: str) -> list[JobRecord]:
    """Every job of the batch, then every path it rejected at submit, each in name order."""
    task = store.get_batch(batch_id).task
    return ([JobRecord.from_row(*row) for row in store.batch_rows(batch_id)]
            + [JobRecord.from_reject(reject, task) for reject in store.batch_rejects(batch_id)])


def render(records: Iterable[JobRecord], fmt: str) -> str:
    """The records as `jsonl` (one JSON object a line) or `csv` (the result as a JSON string column)."""
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
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
