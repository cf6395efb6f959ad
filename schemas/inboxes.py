"""An inbox: a folder that `docbatch beat` scans on a schedule, as the settings file declares it.

```toml
[[inbox]]
name = "contracts"             # letters, digits, - _ . (unique)
folder = "/srv/inbox/contracts"
task = "summarize"             # or task_file = "/srv/tasks/nda_review.toml"
every_s = 60                   # or crontab = "*/5 * * * *" (minute hour day-of-month month day-of-week)
after = "move"                 # leave | move (to processed/ or failed/) | delete (done ones; failed ones move)
settle_s = 10                  # a file is taken once unchanged for this long
```
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INBOX_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
BATCH_LABEL_PREFIX = "inbox:"  # an inbox's batches carry the label `inbox:NAME`; its ledger is read by that label


class InboxConfig(BaseModel):
    """One `[[inbox]]` table of the settings file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    folder: Path
    task: Literal["summarize", "extract"] | None = None
    task_file: Path | None = None
    every_s: float | None = Field(None, gt=0, description="scan every this many seconds")
    crontab: str | None = Field(None, description="or on a cron schedule: minute hour day-of-month month day-of-week")
    after: Literal["leave", "move", "delete"] = "move"
    settle_s: float = Field(10.0, ge=0, description="a file unchanged for this long is complete")
    priority: int = Field(5, ge=0, le=9)
    processed_dir: Path | None = Field(None, description="done files go here; default `processed/` beside the folder")
    failed_dir: Path | None = Field(None, description="failed files go here; default `failed/` beside the folder")

    @model_validator(mode="after")
    def _check(self) -> "InboxConfig":
        where = f"inbox {self.name!r}"
        if not INBOX_NAME.match(self.name):
            raise ValueError(f"{where}: a name is 1-64 letters, digits, '-', '_' or '.'")
        if (self.task is None) == (self.task_file is None):
            raise ValueError(f"{where}: give one of task (summarize or extract) or task_file")
        if (self.every_s is None) == (self.crontab is None):
            raise ValueError(f"{where}: give one of every_s (seconds) or crontab (\"*/5 * * * *\")")
        if self.crontab is not None:
            cron_fields(self.crontab, where)
        for kind, folder in (("processed_dir", self.done_folder), ("failed_dir", self.failed_folder)):
            if folder.resolve().is_relative_to(self.folder.resolve()):
                raise ValueError(f"{where}: {kind} {folder} lies inside the inbox, whose files would be taken again")
        return self

    @property
    def batch_label(self) -> str:
        return f"{BATCH_LABEL_PREFIX}{self.name}"

    @property
    def done_folder(self) -> Path:
        return self.processed_dir or self.folder.parent / "processed"

    @property
    def failed_folder(self) -> Path:
        return self.failed_dir or self.folder.parent / "failed"

    @property
    def schedule_text(self) -> str:
        return f"every {self.every_s:g} s" if self.every_s is not None else f"cron {self.crontab}"


def cron_fields(expression: str, where: str = "crontab") -> tuple[str, str, str, str, str]:
    """The five fields of a crontab expression, checked by Celery's own parser; ValueError says which is wrong."""
    from celery.schedules import ParseException, crontab

    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{where}: crontab {expression!r} needs 5 fields (minute hour day-of-month month "
                         f"day-of-week), not {len(fields)}")
    minute, hour, day_of_month, month, day_of_week = fields
    try:
        crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month, day_of_week=day_of_week)
    except (ValueError, ParseException) as e:
        raise ValueError(f"{where}: crontab {expression!r}: {e}") from e
    return minute, hour, day_of_month, month, day_of_week
