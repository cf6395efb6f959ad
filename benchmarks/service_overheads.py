"""What running docbatch as a service costs on top of the work: a beat tick over an inbox of N files (the
first, which takes them all in, and an idle one, which finds nothing new), one scrape of a worker's
metrics endpoint, and the per-task job observation behind the counters.

    python benchmarks/service_overheads.py --files 100 1000 5000

Real parts: an embedded redis-server, a SQLite store, files on disk; no worker runs, so the jobs stay
queued and each idle tick finds every file waiting on its job (the common case of a busy inbox).
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402 - after the path set-up above
from rich.console import Console  # noqa: E402

from producer.service.embedded import embedded_redis, free_port  # noqa: E402
from producer.service.inbox import Scanner  # noqa: E402
from producer.intake.submit import Source, submit  # noqa: E402
from schemas.inboxes import InboxConfig  # noqa: E402
from schemas.messages import make_celery  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from schemas.sql.store import Store  # noqa: E402
from schemas.tasks import builtin_task  # noqa: E402


def write_folder(folder: Path, num_files: int) -> None:
    folder.mkdir()
    for i in range(num_files):
        (folder / f"doc{i:05d}.txt").write_text(f"Agreement {i} between Acme Corp and Globex Ltd. " * 40)


def submit_cost(num_files: int, broker_url: str, root: Path) -> float:
    """The baseline: seconds `docbatch submit` takes over the same files (a fresh store)."""
    folder = root / f"submitted{num_files}"
    write_folder(folder, num_files)
    settings = Settings(home=root / f"submit-home{num_files}", broker_url=broker_url)
    store = Store(settings.effective_database_url)
    store.migrate()
    started = time.perf_counter()
    submit(settings, store, make_celery(settings), Source(paths=(folder,)), builtin_task("summarize", settings),
           console=Console(file=io.StringIO()))
    seconds = time.perf_counter() - started
    store.close()
    return seconds


def tick_costs(num_files: int, broker_url: str, root: Path) -> tuple[float, float, float]:
    """Seconds of the first tick (takes every file in), an idle tick, and an idle tick by a fresh scanner."""
    folder = root / f"inbox{num_files}"
    write_folder(folder, num_files)
    settings = Settings(home=root / f"home{num_files}", broker_url=broker_url,
                        inbox=(InboxConfig(name=f"b{num_files}", folder=folder, task="summarize", every_s=60,
                                           settle_s=0),))
    store = Store(settings.effective_database_url)
    store.migrate()

    def scanner() -> Scanner:
        return Scanner(settings, store, make_celery(settings), redis.Redis.from_url(broker_url))

    first, warm = scanner(), None
    seconds = []
    for tick in (first, first, scanner()):
        started = time.perf_counter()
        report = tick.tick(settings.inbox[0])
        seconds.append(time.perf_counter() - started)
        if report.error:
            raise RuntimeError(report.error)
        warm = report
    assert warm is not None and warm.waiting == num_files
    store.close()
    return seconds[0], seconds[1], seconds[2]


def observation_cost(root: Path) -> float:
    """Median seconds of what `task_postrun` adds to each task: reading its job back (SQLite)."""
    store = Store(f"sqlite:///{root / 'home100' / 'docbatch.sqlite3'}")
    job_ids = [job.id for _, job, _ in store.batch_rows(store.latest_batch_ids(1)[0])]
    seconds = []
    for job_id in job_ids:
        started = time.perf_counter()
        store.get_job(job_id)
        seconds.append(time.perf_counter() - started)
    store.close()
    return statistics.median(seconds)


def scrape_cost(root: Path, num_outcomes: int, num_scrapes: int) -> tuple[float, int]:
    """Median seconds of one scrape of an exporter holding `num_outcomes` recorded jobs, and its size."""
    from worker.telemetry import metrics
    from worker.telemetry.exporter import start_telemetry

    settings = Settings(home=root / "metrics-home", metrics_port=free_port(), alert_interval_s=3600)
    telemetry = start_telemetry(settings, "infer", "bench@local")
    for i in range(num_outcomes):
        reason = None if i % 10 else "schema_invalid"
        metrics.record(metrics.JobOutcome("infer", "failed" if reason else "done", reason, 0.5 + i % 7, 2.0), None)
    seconds, size = [], 0
    for _ in range(num_scrapes):
        started = time.perf_counter()
        with urllib.request.urlopen(telemetry.url, timeout=10) as response:
            size = len(response.read())
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[100, 1000], help="inbox sizes; include 100")
    parser.add_argument("--scrapes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, embedded_redis() as broker_url:
        root = Path(tmp)
        print("| files | `submit` (baseline) | first tick (takes all in) | idle tick | idle tick, fresh scanner |")
        print("| --- | --- | --- | --- | --- |")
        for num_files in args.files:
            baseline = submit_cost(num_files, broker_url, root)
            first, idle, fresh = tick_costs(num_files, broker_url, root)
            print(f"| {num_files} | {baseline:.2f} s | {first:.2f} s | {idle * 1000:.0f} ms | {fresh * 1000:.0f} ms |")
        median_s, size = scrape_cost(root, 10_000, args.scrapes)
        print(f"\nmetrics scrape: {median_s * 1000:.1f} ms median over {args.scrapes} scrapes, {size} bytes")
        print(f"job observation after a task (read the job back): {observation_cost(root) * 1000:.2f} ms median")


if __name__ == "__main__":
    main()
