"""`docbatch inbox list`: each inbox, its schedule, its last scan (kept in Redis by the beat that ran it),
and what it has taken in (read from SQL: the batches labelled `inbox:NAME`)."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

import redis

from schemas.inboxes import InboxConfig
from schemas.sql.ledger import LabelSummary, label_summary
from schemas.sql.store import Store

REPORT_TTL_S = 30 * 24 * 3600


def _report_key(inbox_name: str) -> str:
    return f"docbatch:inbox:{inbox_name}:last_scan"


def save_report(client: redis.Redis, report: Any) -> None:
    """Keep a tick's report (a `producer.service.inbox.ScanReport`) as the inbox's last scan."""
    client.set(_report_key(report.inbox), json.dumps(dataclasses.asdict(report)), ex=REPORT_TTL_S)


def load_report(client: redis.Redis, inbox_name: str) -> dict[str, Any] | None:
    raw = client.get(_report_key(inbox_name))
    return json.loads(raw) if raw else None


@dataclass(frozen=True)
class InboxRow:
    inbox: InboxConfig
    last_scan: dict[str, Any] | None
    summary: LabelSummary

    @property
    def last_scan_text(self) -> str:
        scan = self.last_scan
        if scan is None:
            return "never"
        when = dt.datetime.fromtimestamp(scan["started_at"]).strftime("%Y-%m-%d %H:%M:%S")
        if scan["error"]:
            return f"{when}: failed: {scan['error']}"
        if scan["skipped"]:
            return f"{when}: skipped: {scan['skipped']}"
        parts = [f"{scan['seen']} files", f"{len(scan['taken'])} taken"]
        parts += [f"{scan[key]} {key}" for key in ("unsettled", "waiting") if scan[key]]
        parts += [f"{n} {how.replace('_', ' ')}" for how, n in scan["disposed"].items()]
        return f"{when}: " + ", ".join(parts)


def inbox_rows(inboxes: tuple[InboxConfig, ...], store: Store, client: redis.Redis) -> list[InboxRow]:
    return [InboxRow(inbox, load_report(client, inbox.name), label_summary(store, inbox.batch_label))
            for inbox in inboxes]
