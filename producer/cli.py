"""The `docbatch` command line: submit, status, results, worker, run, demo; the service commands (beat,
inbox, flower, top, up) are in `producer.service_cli`."""
from __future__ import annotations

import importlib.resources
import logging
import re
import sys
from pathlib import Path

import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Column, Table

from producer.results.export import FORMATS
from producer.jobs_cli import COMMANDS as JOB_COMMANDS
from producer.jobs_cli import resolve
from producer.service_cli import COMMANDS as SERVICE_COMMANDS
from producer.service_cli import refuse_weak_passwords
from schemas.records import BatchStatus, JobRecord
from schemas.settings import Settings, model_caveat
from schemas.states import JobState
from schemas.sql.store import Store
from schemas.tasks import (
    BUILTIN_TASKS,
    CHAT_TASK,
    TEMPLATE_VARIABLES,
    TaskDefinition,
    builtin_task,
    load_task_file,
)

console = Console(stderr=True, soft_wrap=True)
# Room for a contract summary's JSON; the retry at twice the room (1,024) can hold the 800-character summary even when
# the packaged model loops on one-digit tokens ("2024-02-12T12:30:00Z_12:30:00_..."), which 768 could not
DEMO_MAX_NEW_TOKENS = 512
# The packaged model's greedy answers loop inside a long string (a summary, an obligation) at the default 1.1 often
# enough that a fresh clone's demo failed the mutual NDA (cut off at twice the room); at 1.3 every sample was answered
# whole with 1 and with 2 engine threads
DEMO_REPETITION_PENALTY = 1.3
PYDANTIC_URL = re.compile(r"\s*For further information visit https://errors\.pydantic\.dev/\S*")
TASK_FILE_HELP = ("\b\nA --task-file prompt is a Jinja2 template of the user's turn; its variables:\n"
                  + "\n".join(f"  {{{{ {name} }}}}  {meaning}" for name, meaning in TEMPLATE_VARIABLES.items()))


def _settings(ctx: click.Context) -> Settings:
    return ctx.obj


def error_text(error: BaseException) -> str:
    """An error as the command line says it: pydantic's validation errors one per setting (`DOCBATCH_...`),
    without the link to pydantic's documentation it appends to each."""
    if isinstance(error, ValidationError):
        problems = []
        for found in error.errors(include_url=False):
            where = "DOCBATCH_" + "_".join(str(part) for part in found["loc"]).upper() if found["loc"] else ""
            message = found["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        return "; ".join(problems)
    return PYDANTIC_URL.sub("", str(error))


def _store(settings: Settings) -> Store:
    store = Store(settings.effective_database_url, settings.blob_dir)
    store.migrate()
    return store


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="docbatch", message="docbatch %(version)s")
@click.pass_context
def main(ctx: click.Context) -> None:
    """docbatch: run an LLM over folders of contracts and financial reports, batched on your GPUs.

    \b
    Quick start on one machine (embedded Redis, SQLite, the small packaged model):
      docbatch demo
      docbatch run ./contracts --task summarize
    On a cluster: `docbatch worker --gpus all` on each GPU host, then
      docbatch submit ./inbox --task extract --wait
      docbatch results BATCH --format csv --out results.csv
    Your own task, or an OpenAI Batch file moved onto your GPUs:
      docbatch submit ./inbox --task-file nda_review.toml
      docbatch submit --openai-batch requests.jsonl --wait
      docbatch results BATCH --format openai --out output.jsonl
    As a service: inboxes scanned on a schedule, a dashboard, a live view, all of it locally:
      docbatch beat        docbatch flower        docbatch top        docbatch up
    Jobs already queued: who holds what, stop what has not started, run failures again:
      docbatch workers     docbatch cancel BATCH  docbatch retry BATCH [--failed CODE]

    Configuration comes from DOCBATCH_* variables and ./docbatch.toml (see README):
    DOCBATCH_DATABASE_URL, DOCBATCH_BROKER_URL, DOCBATCH_MODEL, DOCBATCH_HOME, ...
    """
    try:
        ctx.obj = Settings.load()
    except ValueError as e:
        raise click.ClickException(f"bad configuration: {error_text(e)}") from e


def _task_options(command):
    """--task / --task-file / --openai-batch: what to do with the inputs (exactly one of them)."""
    command = click.option("--openai-batch", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                           help="an OpenAI Batch input file (/v1/chat/completions lines) instead of PATHS")(command)
    command = click.option("--task-file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                           help="a custom task: TOML with name, prompt, optional json_schema and [generation]; "
                                "see README")(command)
    return click.option("--task", type=click.Choice(BUILTIN_TASKS),
                        help="summarize (contract summary JSON) or extract (financial report JSON)")(command)


def _resolve(settings: Settings, paths: tuple[Path, ...], task: str | None, task_file: Path | None,
             openai_batch: Path | None):
    """The inputs and the task definition the options name, or a usage error that says what to give."""
    from producer.intake.submit import Source

    chosen = [name for name, value in (("--task", task), ("--task-file", task_file), ("--openai-batch", openai_batch))
              if value is not None]
    if len(chosen) != 1:
        raise click.UsageError("give one of --task NAME, --task-file FILE or --openai-batch FILE"
                               + (f" (not {' and '.join(chosen)})" if chosen else ""))
    if openai_batch is not None:
        if paths:
            raise click.UsageError("--openai-batch takes its requests from the file; give no PATHS")
        return Source(openai_batch=openai_batch), builtin_task(CHAT_TASK, settings)
    if not paths:
        raise click.UsageError("give the folders or files to process (PATHS)")
    try:
        definition = load_task_file(task_file, settings) if task_file else builtin_task(task, settings)
    except ValueError as e:
        raise click.ClickException(error_text(e)) from e
    return Source(paths=paths), definition


@main.command("submit", epilog=TASK_FILE_HELP)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path, exists=True))
@_task_options
@click.option("--wait", is_flag=True, help="show progress until the batch ends; exit 1 if any job failed")
@click.option("--priority", type=click.IntRange(0, 9), default=5, show_default=True, help="9 runs first")
@click.option("--label", help="free text stored with the batch")
@click.pass_context
def submit_command(ctx, paths, task, task_file, openai_batch, wait, priority, label) -> None:
    """Queue every document under PATHS (folders are walked recursively), or every request of an
    OpenAI Batch file.

    Every regular file is taken; its type comes from its content (text in any common encoding, PDF,
    PNG, JPEG, TIFF). FIFOs, devices, symlinks out of the folder and files over max_file_bytes are
    rejected with a reason code, without being opened. Documents already done for the same task
    definition and model are listed in the new batch but not computed again. Prints the batch id on stdout.

    Exit codes: 0 done (or queued, without --wait); 1 a job failed; 2 bad usage (a path that does not
    exist, say); 3 Redis unreachable (the batch is recorded, its jobs go out when Redis is back).
    """
    from producer.results.progress import wait_for_batch
    from producer.intake.submit import BrokerUnreachable, submit
    from producer.service.top_data import engines_tokens_out
    from schemas.messages import make_celery

    settings = _settings(ctx)
    source, definition = _resolve(settings, paths, task, task_file, openai_batch)
    store = _store(settings)
    try:
        result = submit(settings, store, make_celery(settings), source, definition, priority=priority, label=label,
                        console=console)
    except ValueError as e:
        raise click.ClickException(error_text(e)) from e
    except BrokerUnreachable as e:
        batch = e.submission.batch
        console.print(f"[red]error:[/] {e.reason}. Batch {batch.batch_id} is recorded with "
                      f"{len(batch.to_enqueue)} jobs queued; they are sent when Redis is back: a running worker's "
                      "sweep sends them within a minute, or submit the same inputs again.")
        click.echo(batch.batch_id)
        sys.exit(3)
    _report_submission(result, definition)
    click.echo(result.batch.batch_id)
    if wait:
        status = wait_for_batch(store, result.batch.batch_id, console=console,
                                workers_tokens_out=lambda: engines_tokens_out(make_celery(settings)))
        _print_status([status])
        sys.exit(1 if status.failed else 0)


@main.command("status")
@click.argument("batch", required=False)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per batch: batch, total, one key per state")
@click.pass_context
def status_command(ctx, batch, as_json) -> None:
    """Job counts by state for BATCH (its id or any unique prefix of 6 characters or more), or for the 20 newest
    batches and the workers alive now (what each holds)."""
    from producer.jobs_cli import print_workers
    from producer.results.progress import batch_status

    store = _store(_settings(ctx))
    batch_ids = [resolve(store, batch)[1]] if batch else store.latest_batch_ids()
    statuses = [batch_status(store, b) for b in batch_ids]
    if as_json:
        for status in statuses:
            click.echo(status.model_dump_json())
    else:
        _print_status(statuses, store)
        if not batch:
            print_workers(store, seen_within_s=60, out=Console())


@main.command("results")
@click.argument("batch")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl",
              show_default=True, help="md: a readable report per document; openai: the OpenAI Batch output format")
@click.option("--out", type=click.Path(path_type=Path), help="write to this file instead of stdout")
@click.pass_context
def results_command(ctx, batch, fmt, out) -> None:
    """One record per job of BATCH (its id or any unique prefix of 6 characters or more): job_id, name, sha256,
    task, state, result or error (with the consistency checks' warnings), worker, batch_size, tokens_in,
    tokens_out, timings."""
    from producer.results.export import batch_records, render

    store = _store(_settings(ctx))
    batch = resolve(store, batch)[1]
    text = render(batch_records(store, batch), fmt, title=f"docbatch batch {batch}", batch=store.get_batch(batch))
    if out:
        out.write_text(text, encoding="utf-8")
        console.print(f"wrote {out}")
    else:
        click.echo(text, nl=False)


@main.command("worker")
@click.option("--gpus", default="auto", show_default=True,
              help="auto, all, cpu, none (prepare only), or GPU indices: 0,1 (a process each) or 0+1 (one "
                   "process, model sharded)")
@click.option("--max-batch-size", type=click.IntRange(min=1), help="rows in one generate call")
@click.option("--max-batch-tokens", type=click.IntRange(min=64), help="padded prompt+new tokens in one batch")
@click.option("--max-wait-ms", type=click.IntRange(min=0), help="how long to wait for a batch to fill")
@click.option("--no-prepare", is_flag=True, help="run no prepare (CPU extraction) process on this host")
@click.pass_context
def worker_command(ctx, gpus, max_batch_size, max_batch_tokens, max_wait_ms, no_prepare) -> None:
    """Start one inference worker per GPU (named gpuN@host) and a prepare worker; Ctrl-C stops them."""
    from worker.service.launcher import launch

    overrides = {k: v for k, v in dict(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                                       max_wait_ms=max_wait_ms).items() if v is not None}
    settings = _settings(ctx).model_copy(update=overrides)
    refuse_weak_passwords(settings)
    _store(settings).close()  # migrate once here, before the children start
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(launch(settings, gpus, with_prepare=not no_prepare))
    except ValueError as e:
        raise click.ClickException(error_text(e)) from e


@main.command("run", epilog=TASK_FILE_HELP)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path, exists=True))
@_task_options
@click.option("--gpus", default="auto", show_default=True, help="as for `docbatch worker`")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("docbatch-results"), show_default=True)
@click.pass_context
def run_command(ctx, paths, task, task_file, openai_batch, gpus, out_dir) -> None:
    """Everything on this machine: Redis (embedded if none answers), a local worker, submit, progress,
    results in OUT_DIR/BATCH.jsonl (and OUT_DIR/BATCH.openai.jsonl for --openai-batch). Exit code 0 when
    every job is done, 1 when any failed. SIGTERM, SIGHUP or Ctrl-C stops the local worker, writes the results
    finished by then and exits 128 + the signal's number (143 for SIGTERM)."""
    settings = _settings(ctx)
    source, definition = _resolve(settings, paths, task, task_file, openai_batch)
    sys.exit(_run_and_show(settings, source, definition, gpus, out_dir))


@main.command("demo")
@click.option("--gpus", default="auto", show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("docbatch-results"), show_default=True)
@click.pass_context
def demo_command(ctx, gpus, out_dir) -> None:
    """`run` over the bundled sample documents: contracts summarized, financial reports extracted.

    Answers are capped at DEMO_MAX_NEW_TOKENS so that the demo takes a few minutes on a laptop CPU, and decoded with
    DEMO_REPETITION_PENALTY, unless the settings say otherwise."""
    from producer.intake.submit import Source
    from producer.run import Stopped, local_pipeline

    samples = importlib.resources.files("producer") / "samples"
    settings = _settings(ctx)
    demo_defaults = {"max_new_tokens": DEMO_MAX_NEW_TOKENS, "repetition_penalty": DEMO_REPETITION_PENALTY}
    settings = settings.model_copy(update={name: value for name, value in demo_defaults.items()
                                           if name not in settings.model_fields_set})
    for line in demo_banner(settings.model):
        console.print(line, highlight=False)
    code = 0
    runs = [(f"{task}: bundled {folder}", Source(paths=(Path(str(samples / folder)),)), builtin_task(task, settings))
            for folder, task in (("contracts", "summarize"), ("financials", "extract"))]
    try:
        # Both batches are submitted first: one worker answers them, their rows sharing the engine's steps.
        with local_pipeline(settings, gpus, console) as pipeline:
            submitted = [(title, pipeline.submit(source, definition), definition)
                         for title, source, definition in runs]
            for title, submission, definition in submitted:
                console.rule(title)
                code |= _show(pipeline.finish(submission, out_dir), definition)
    except ValueError as e:
        raise click.ClickException(error_text(e)) from e
    except Stopped as stopped:
        _stopped_before_recording(stopped)
    if caveat := model_caveat(settings.model):  # said again under the answers, where the reader's eyes are
        console.rule()
        console.print(caveat, highlight=False)
    sys.exit(code)


def demo_banner(model: str) -> list[str]:
    """The demo's first lines: which model answers and, for the packaged one, what its answers are worth."""
    caveat = model_caveat(model)
    return [f"docbatch demo: the model {model} answers", *([caveat] if caveat else [])]


def _run_and_show(settings: Settings, source, definition: TaskDefinition, gpus: str, out_dir: Path) -> int:
    """`run`, shown; its exit code: 0 when every job is done, 1 when any failed. Stopped by a signal, the process
    exits at once with 128 + its number."""
    from producer.run import Stopped, run

    try:
        outcome = run(settings, source, definition, gpus=gpus, out_dir=out_dir, console=console)
    except ValueError as e:
        raise click.ClickException(error_text(e)) from e
    except Stopped as stopped:
        _stopped_before_recording(stopped)
    return _show(outcome, definition)


def _stopped_before_recording(stopped) -> None:
    console.print(f"{stopped}: stopped before the batch was recorded", highlight=False)
    sys.exit(stopped.exit_code)


def _show(outcome, definition: TaskDefinition) -> int:
    """A local run's submission, records, status and results file; 1 when a job failed, else 0. A run that a signal
    stopped exits here, with 128 + its number."""
    _report_submission(outcome.submission, definition)
    _print_records(outcome.records)
    _print_status([outcome.status])
    batch_id = outcome.submission.batch.batch_id
    console.print(f"results: {outcome.results_path}  (a readable report: docbatch results {batch_id} --format md)")
    if outcome.stopped_by is not None:
        console.print(f"stopped by {outcome.stopped_by}: the results finished by then are written; the same "
                      f"`docbatch run` finishes the rest", highlight=False)
        sys.exit(outcome.stopped_by.exit_code)
    return 1 if outcome.status.failed else 0


def _report_submission(result, definition: TaskDefinition) -> None:
    collected = result.collected
    inputs = "requests" if definition.kind == "chat" else "files"
    console.print(f"{collected.num_inputs} {inputs}, {collected.num_new_documents} new documents stored; "
                  f"task {definition.name} ({definition.hash[:12]})")
    for path in collected.skipped:
        console.print(f"[dim]skipped hidden or symlinked folder {path}[/]")
    for reject in collected.rejects:
        console.print(f"[yellow]rejected[/] {reject.name}: {reject.code.value}: {reject.message}")


STATUS_ID_CHARS = 12  # a batch's id as the status table shows it: every command takes this prefix
# The status table's counts: jobs not yet on a GPU (queued, being extracted, ready, a long document waiting on its
# chunks) are "pending"; `status --json` has every state. Fixed, so that the table fits 80 columns with whole headers.
STATUS_COUNTS = {"total": (), "pending": (JobState.QUEUED, JobState.PREPARING, JobState.READY, JobState.WAITING),
                 "running": (JobState.RUNNING,), "done": (JobState.DONE,), "failed": (JobState.FAILED,),
                 "cancelled": (JobState.CANCELLED,)}


def _print_status(statuses: list[BatchStatus], store: Store | None = None) -> None:
    """One row per batch (its id shortened to a prefix every command takes), with its task and label when
    `store` is given, cut short to fit the terminal (80 columns leave them 16)."""
    out = Console()
    rows = [[status.batch[:STATUS_ID_CHARS], str(status.total),
             *(str(sum(getattr(status, state.value) for state in states)) for states in
               list(STATUS_COUNTS.values())[1:])] for status in statuses]
    columns = [Column("batch", no_wrap=True),
               *(Column(header, justify="right", no_wrap=True, min_width=len(header)) for header in STATUS_COUNTS)]
    if store:
        names = [(batch.task, batch.label or "") if batch else ("", "")
                 for batch in (store.get_batch(status.batch) for status in statuses)]
        counts_width = sum(max([len(h)] + [len(row[1 + i]) for row in rows]) for i, h in enumerate(STATUS_COUNTS))
        room = max(out.width - STATUS_ID_CHARS - counts_width - 2 * (len(STATUS_COUNTS) + 2), 10)
        task_width = min(max([4] + [len(task) for task, _ in names]), max(room - 5, room // 2))
        columns[1:1] = [Column("task", no_wrap=True, overflow="ellipsis", max_width=task_width),
                        Column("label", no_wrap=True, overflow="ellipsis", max_width=max(room - task_width, 5))]
        rows = [[row[0], *name, *row[1:]] for row, name in zip(rows, names)]
    table = Table(*columns, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _print_records(records: list[JobRecord]) -> None:
    out = Console()
    for record in records:
        header = f"[bold]{record.name}[/] [dim]{record.state.value}"
        if record.state == JobState.DONE:
            header += f" · batch of {record.batch_size} · {record.tokens_in} in / {record.tokens_out} out tokens"
        out.rule(header + "[/]", align="left")
        if record.result is not None:
            out.print(record.result.get("json") or record.result["text"], highlight=False)
            for warning in record.result.get("warnings", []):
                out.print(f"[yellow]warning[/] {warning['code']}: {warning['message']}")
        elif record.error_code:
            out.print(f"[red]{record.error_code}[/]: {record.error_message}")


for _command in [*JOB_COMMANDS, *SERVICE_COMMANDS]:
    main.add_command(_command)

if __name__ == "__main__":
    main()
