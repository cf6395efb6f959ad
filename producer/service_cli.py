"""The `docbatch` commands that run it as a service: beat, inbox, flower, top, up, api and its keys."""
from __future__ import annotations

import logging
import os
import sys

import click
import redis
from rich.console import Console
from rich.table import Table

from schemas.passwords import WeakPassword, check_passwords
from schemas.settings import Settings
from schemas.sql.store import Store

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
INBOX_HELP = """\b
Inboxes are [[inbox]] tables of the settings file ($DOCBATCH_CONFIG, default ./docbatch.toml):
  [[inbox]]
  name = "contracts"
  folder = "/srv/inbox/contracts"
  task = "summarize"          # or task_file = "my_task.toml"
  every_s = 60                # or crontab = "*/5 * * * *"
  after = "move"              # leave | move (processed/, failed/ beside it) | delete
  settle_s = 10               # taken once unchanged this long"""


def _console() -> Console:
    """stdout; when it is not a terminal (a pipe, a log), wide enough that tables do not wrap."""
    console = Console(soft_wrap=True)
    return console if console.is_terminal else Console(width=200)


def refuse_weak_passwords(settings: Settings) -> None:
    """What every command that starts a docbatch process calls first (`schemas.passwords`)."""
    try:
        check_passwords(settings)
    except WeakPassword as e:
        raise click.ClickException(str(e)) from e


def _open(settings: Settings) -> tuple[Store, redis.Redis]:
    store = Store(settings.effective_database_url, settings.blob_dir)
    store.migrate()
    return store, redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30)


def _scanner(settings: Settings):
    from producer.service.inbox import Scanner
    from schemas.messages import make_celery

    if not settings.inbox:
        raise click.ClickException("no inbox is configured: add [[inbox]] tables to the settings file (see "
                                   "`docbatch inbox --help`)")
    store, client = _open(settings)
    return Scanner(settings, store, make_celery(settings), client)


@click.command("beat", epilog=INBOX_HELP)
@click.pass_obj
def beat_command(settings: Settings) -> None:
    """Scan the configured inboxes on their schedules (Celery beat); Ctrl-C stops after the running scans.

    Each tick takes the files that have settled and are new into one batch, and moves or deletes the files
    whose jobs have ended. A file is never taken twice, even by two beats; a tick that finds nothing new
    makes no batch."""
    from producer.service.beat import run_beat

    refuse_weak_passwords(settings)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    scanner = _scanner(settings)
    run_beat(scanner.app, scanner)


@click.group("inbox", epilog=INBOX_HELP)
def inbox_group() -> None:
    """The inboxes `docbatch beat` scans: list them, or scan them once now."""


@inbox_group.command("list")
@click.pass_obj
def inbox_list_command(settings: Settings) -> None:
    """Each inbox: its folder, task, schedule, last scan, the files it took and the batches it made."""
    from producer.service.inbox_status import inbox_rows

    if not settings.inbox:
        raise click.ClickException("no inbox is configured: add [[inbox]] tables to the settings file")
    store, client = _open(settings)
    table = Table("inbox", "folder", "task", "schedule", "after", "last scan", "files taken", "batches", "newest")
    for row in inbox_rows(settings.inbox, store, client):
        inbox, summary = row.inbox, row.summary
        table.add_row(inbox.name, str(inbox.folder), inbox.task or str(inbox.task_file), inbox.schedule_text,
                      inbox.after, row.last_scan_text, str(summary.num_files), str(summary.num_batches),
                      summary.last_batch_id or "-")
    _console().print(table)


@inbox_group.command("scan")
@click.argument("names", nargs=-1)
@click.pass_obj
def inbox_scan_command(settings: Settings, names: tuple[str, ...]) -> None:
    """Scan the inboxes NAMES (default: all) once now, as a beat tick would (for a system cron, or to try
    a new inbox). Prints each new batch id; exits 1 if a scan failed."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    scanner = _scanner(settings)
    unknown = set(names) - {inbox.name for inbox in settings.inbox}
    if unknown:
        raise click.ClickException(f"no inbox named {', '.join(sorted(unknown))}")
    failed = False
    for inbox in settings.inbox:
        if not names or inbox.name in names:
            report = scanner.tick(inbox)
            failed |= report.error is not None
            if report.batch_id:
                click.echo(report.batch_id)
    sys.exit(1 if failed else 0)


@click.command("flower")
@click.option("--address", help="interface to listen on [default: flower_address, 127.0.0.1]")
@click.option("--port", type=click.IntRange(1, 65535), help="[default: flower_port, 5555]")
@click.option("--read-only", is_flag=True, help="show only: no revoking tasks, no shutting workers down")
@click.option("--insecure-local", is_flag=True, help="no password, on a loopback address only (this machine)")
@click.pass_obj
def flower_command(settings: Settings, address, port, read_only, insecure_local) -> None:
    """Flower, the Celery dashboard, on docbatch's broker: workers (gpu0@host, ...), queues (prepare,
    infer), tasks with their documents' names.

    \b
    It requires basic auth: set DOCBATCH_FLOWER_USER and DOCBATCH_FLOWER_PASSWORD (or flower_user and
    flower_password in the settings file). Same as: celery -A worker.celery_app flower"""
    from producer.service.flower import FlowerRefused, flower_launch

    refuse_weak_passwords(settings)
    try:
        launch = flower_launch(settings, address=address or settings.flower_address,
                               port=port or settings.flower_port, read_only=read_only, insecure_local=insecure_local)
    except FlowerRefused as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"Flower at {launch.url}", err=True)
    os.execve(launch.argv[0], launch.argv, launch.env)


@click.command("top")
@click.option("--once", is_flag=True, help="print one view and exit")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.5), default=2.0, show_default=True,
              help="seconds between refreshes")
@click.pass_obj
def top_command(settings: Settings, once: bool, interval_s: float) -> None:
    """A live view: workers (role, queues, what they run, jobs done and failed, tokens/s, alerts), GPUs
    (utilisation, memory, temperature, power), queue lengths, and the newest batches' progress.
    Ctrl-C quits."""
    from producer.service.top import run_top
    from schemas.messages import make_celery

    store, client = _open(settings)
    try:
        run_top(make_celery(settings), client, store, once=once, interval_s=interval_s, console=_console())
    except redis.RedisError as e:
        raise click.ClickException(f"cannot reach Redis at {settings.broker_url}: {e}") from e


@click.command("up")
@click.option("--gpus", default="auto", show_default=True, help="as for `docbatch worker`")
@click.option("--no-flower", is_flag=True, help="do not start Flower")
@click.option("--insecure-local", is_flag=True, help="start Flower without a password, on 127.0.0.1 only")
@click.option("--no-api", is_flag=True, help="do not start the HTTP API")
@click.pass_obj
def up_command(settings: Settings, gpus: str, no_flower: bool, insecure_local: bool, no_api: bool) -> None:
    """Everything on this machine without Docker: Redis (the configured one, else one started here), a
    worker per visible GPU or the CPU plus a prepare worker, beat (when inboxes are configured), the HTTP API
    (api_address:api_port) and Flower. Logs go to HOME/logs/. Ctrl-C stops it all."""
    from producer.api.server import ApiRefused, check
    from producer.service.flower import FlowerRefused, flower_launch
    from producer.service.up import up

    refuse_weak_passwords(settings)
    if not no_flower:
        try:  # refuse here, before anything starts, rather than lose Flower a moment later
            flower_launch(settings, address=settings.flower_address, port=settings.flower_port, read_only=False,
                          insecure_local=insecure_local)
        except FlowerRefused as e:
            raise click.ClickException(f"{e} (or --no-flower)") from e
    store, _ = _open(settings)
    try:
        if not no_api:
            check(settings, settings.api_address, store)
    except ApiRefused as e:
        raise click.ClickException(f"{e} (or --no-api)") from e
    finally:
        store.close()
    sys.exit(up(settings, gpus=gpus, with_flower=not no_flower, insecure_local=insecure_local,
                console=Console(soft_wrap=True), with_api=not no_api))


@click.command("migrate")
@click.pass_obj
def migrate_command(settings: Settings) -> None:
    """Check the passwords in the settings, bring the database schema to the newest version, then exit (compose
    runs it before the other services, so that `docker compose up` stops early on a placeholder password; every
    command also migrates on first use, under a lock, so hosts may start together)."""
    refuse_weak_passwords(settings)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    Store(settings.effective_database_url, settings.blob_dir).migrate()


@click.command("api")
@click.option("--address", help="interface to listen on [default: api_address, 127.0.0.1]")
@click.option("--port", type=click.IntRange(1, 65535), help="[default: api_port, 8000]")
@click.pass_obj
def api_command(settings: Settings, address, port) -> None:
    """The OpenAI-compatible Files and Batches API (see README "An OpenAI-compatible API"): any program with the
    openai SDK submits with base_url="http://HOST:PORT/v1" and a key from `docbatch api-key create`.

    Beyond a loopback address it refuses to start until a key exists."""
    refuse_weak_passwords(settings)
    from producer.api.server import ApiRefused, serve

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        serve(settings, address or settings.api_address, port or settings.api_port)
    except ApiRefused as e:
        raise click.ClickException(str(e)) from e


@click.group("api-key")
def api_key_group() -> None:
    """Keys of the HTTP API: each sees only its own files and batches."""


@api_key_group.command("create")
@click.argument("name")
@click.pass_obj
def api_key_create_command(settings: Settings, name: str) -> None:
    """Make a key named NAME and print it, once: only its hash is kept."""
    from producer.api.auth import new_key

    store, _ = _open(settings)
    key = new_key()
    try:
        store.add_api_key(key.key_id, name, key.secret_sha256)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    click.echo(key.token)
    click.echo(f"key {name!r} made; this is the only time it is shown", err=True)


@api_key_group.command("list")
@click.pass_obj
def api_key_list_command(settings: Settings) -> None:
    """Every key: name, id (the part after dbk_ a client shows), when made and revoked."""
    store, _ = _open(settings)
    table = Table("name", "id", "created", "revoked")
    for key in store.api_keys():
        table.add_row(key.name, key.id, key.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                      key.revoked_at.strftime("%Y-%m-%d %H:%M:%S") if key.revoked_at else "-")
    _console().print(table)


@api_key_group.command("revoke")
@click.argument("name")
@click.pass_obj
def api_key_revoke_command(settings: Settings, name: str) -> None:
    """Revoke the key NAME: its next request is 401. Its batches run on; its files stay until they expire."""
    store, _ = _open(settings)
    if not store.revoke_api_key(name):
        raise click.ClickException(f"no live key named {name!r}")
    click.echo(f"revoked {name}", err=True)


COMMANDS = [beat_command, inbox_group, flower_command, top_command, up_command, migrate_command, api_command,
            api_key_group]
