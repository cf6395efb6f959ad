"""Inboxes in the settings file, and the Celery beat schedule built from them (the `docbatch beat` process
itself runs in `test_service.py`)."""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
import redis
from celery.schedules import crontab, schedule
from pydantic import ValidationError

from producer.service.beat import SCAN_TASK, InboxScheduler, beat_schedule
from producer.service.embedded import embedded_redis
from producer.service.inbox import Scanner
from schemas.inboxes import InboxConfig
from schemas.messages import make_celery
from schemas.settings import Settings
from schemas.sql.store import Store

TOML = """
[[inbox]]
name = "contracts"
folder = "{folder}/contracts"
task = "summarize"
every_s = 30
after = "delete"

[[inbox]]
name = "reports"
folder = "{folder}/reports"
task_file = "{folder}/task.toml"
crontab = "*/15 9-17 * * mon-fri"
settle_s = 2.5
"""


def test_inboxes_come_from_toml_tables_and_reach_a_child_process_unchanged(monkeypatch, tmp_path):
    config = tmp_path / "docbatch.toml"
    config.write_text(TOML.format(folder=tmp_path))
    monkeypatch.setenv("DOCBATCH_CONFIG", str(config))
    settings = Settings.load()
    contracts, reports = settings.inbox
    assert (contracts.every_s, contracts.after, contracts.done_folder) == (30, "delete", tmp_path / "processed")
    assert (reports.crontab, reports.settle_s, reports.after) == ("*/15 9-17 * * mon-fri", 2.5, "move")
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DOCBATCH_CONFIG", str(tmp_path / "none.toml"))
    assert Settings.load() == settings


@pytest.mark.parametrize("fields, message", [
    ({"task": "summarize", "task_file": "t.toml", "every_s": 5}, "give one of task"),
    ({"task": "summarize"}, "give one of every_s"),
    ({"task": "summarize", "every_s": 5, "crontab": "* * * * *"}, "give one of every_s"),
    ({"task": "summarize", "crontab": "*/5 * * *"}, "needs 5 fields"),
    ({"task": "summarize", "crontab": "61 * * * *"}, "crontab '61 \\* \\* \\* \\*'"),
    ({"task": "summarize", "every_s": 5, "processed_dir": "in/done"}, "lies inside the inbox"),
    ({"task": "translate", "every_s": 5}, "summarize"),
    ({"task": "summarize", "every_s": 5, "after": "archive"}, "leave"),
    ({"task": "summarize", "every_s": 5, "name": "two words"}, "a name is 1-64 letters"),
])
def test_a_bad_inbox_is_refused_with_a_message_that_says_what_to_fix(fields, message):
    with pytest.raises(ValidationError, match=message):
        InboxConfig(**{"name": "in", "folder": "in", **fields})


def test_inbox_names_are_unique():
    inbox = InboxConfig(name="a", folder="x", task="extract", every_s=1)
    with pytest.raises(ValidationError, match="inbox names must be unique"):
        Settings(inbox=(inbox, inbox.model_copy(update={"folder": Path("y")})))


def test_the_schedule_has_an_entry_per_inbox_with_its_interval_or_crontab(tmp_path):
    interval = InboxConfig(name="a", folder=tmp_path, task="extract", every_s=30)
    cron = InboxConfig(name="b", folder=tmp_path, task="extract", crontab="*/15 9-17 * * mon-fri")
    entries = beat_schedule((interval, cron))
    assert set(entries) == {"inbox:a", "inbox:b"}
    assert entries["inbox:a"]["task"] == SCAN_TASK and entries["inbox:a"]["args"] == ("a",)
    assert isinstance(entries["inbox:a"]["schedule"], schedule)
    assert entries["inbox:a"]["schedule"].run_every == dt.timedelta(seconds=30)
    cron_schedule = entries["inbox:b"]["schedule"]
    assert isinstance(cron_schedule, crontab)
    assert cron_schedule.minute == {0, 15, 30, 45} and cron_schedule.hour == set(range(9, 18))
    assert cron_schedule.day_of_week == {1, 2, 3, 4, 5}


def test_celery_beats_scheduler_runs_a_due_inbox_entry_as_a_scan_in_its_own_process(tmp_path):
    # Given an inbox with a settled file, and Celery's scheduler built with the inbox entries
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("Agreement A.")
    with embedded_redis() as url:
        settings = Settings(home=tmp_path / "home", broker_url=url,
                            inbox=(InboxConfig(name="in", folder=folder, task="summarize", every_s=1, settle_s=0),))
        store = Store(settings.effective_database_url)
        store.migrate()
        app = make_celery(settings)
        app.conf.beat_schedule = beat_schedule(settings.inbox)
        scheduler = InboxScheduler(app=app, scanner=Scanner(settings, store, app, redis.Redis.from_url(url)))

        # When beat's loop ticks until the entry is due
        deadline = time.monotonic() + 30
        while not store.latest_batch_ids() and time.monotonic() < deadline:
            time.sleep(max(0.0, min(scheduler.tick(), 0.2)))
        scheduler.close()

        # Then the scan ran here and took the file
        (batch_id,) = store.latest_batch_ids()
        assert store.get_batch(batch_id).label == "inbox:in"
        assert redis.Redis.from_url(url).llen("prepare") + redis.Redis.from_url(url).llen("prepare:4") == 1
        store.close()
