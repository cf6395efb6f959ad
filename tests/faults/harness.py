"""The fault harness: a real docbatch worker on its own Redis and PostgreSQL, a batch of documents, one
fault injected at a random point of the run, and the invariants checked at the end.

    python tests/faults/harness.py --docs 24 --faults all --out /tmp/faults     # the full suite
    python tests/faults/harness.py --docs 200 --faults kill_infer,redis_wiped    # larger, chosen faults
    python tests/faults/harness.py --docs 15 --faults poison,two_poisons         # hostile documents

Each fault of the full suite gets services and a worker of its own (`Rig`); `tests/faults/test_faults.py`
runs a short version in CI, three faults on one rig. Everything is real: redis-server with AOF, PostgreSQL
(initdb into a temporary folder, run as the `postgres` user), `docbatch worker --gpus cpu` with the packaged
small model. Recovery time is measured from the moment the fault ends (the worker or the service is back)
to the moment the last job ends.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from producer.service.embedded import free_port  # noqa: E402
from schemas.messages import make_celery  # noqa: E402
from schemas.sql.models import Job, Result  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from schemas.states import JobState  # noqa: E402
from schemas.sql.store import Store  # noqa: E402

POSTGRES_BIN = Path("/usr/lib/postgresql") / (sorted(os.listdir("/usr/lib/postgresql"))[-1] if Path(
    "/usr/lib/postgresql").exists() else "none") / "bin"
POISON = "POISON-7f3a"  # the marker of the document that kills its worker (failpoint infer_claimed)
FAULTS = ("kill_infer", "kill_worker", "redis_restart", "redis_wiped", "database_down", "poison", "two_poisons")
POISONS = {"poison": 1, "two_poisons": 2}  # how many documents that kill their worker a fault's batch holds


class Redis:
    """redis-server on a free port, appending every write to its AOF (fsync every second)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: _answers(["redis-cli", "-p", str(self.port), "ping"]), "redis")

    def kill(self, lose_data: bool = False) -> None:
        self.process.kill()
        self.process.wait()
        if lose_data:
            shutil.rmtree(self.folder)


class Postgres:
    """A PostgreSQL cluster of its own (initdb into a folder of /tmp the `postgres` user can reach), on a
    free port."""

    def __init__(self) -> None:
        self.folder, self.port = Path(tempfile.mkdtemp(prefix="docbatch-faults-pg-")), free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/docbatch"

    def _pg(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)

    def start(self, create: bool = False) -> None:
        if create:
            shutil.chown(self.folder, "postgres")
            self._pg(str(POSTGRES_BIN / "initdb"), "-D", str(self.folder / "data"), "-A", "trust", "-U", "postgres")
        self._pg(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.folder / "data"), "-l", str(self.folder / "log"), "-w",
                 "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")
        if create:
            self._pg(str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                     "docbatch")

    def stop(self) -> None:
        self._pg(str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.folder / "data"),
                        "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(self.folder, ignore_errors=True)


class Worker:
    """`docbatch worker --gpus cpu` in a process group of its own."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings, self.log_path = settings, log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "cpu"],
                                        env={**os.environ, **self.settings.to_env(), "PYTHONPATH": str(ROOT)},
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)

    def kill_infer(self) -> None:
        """SIGKILL of the infer process alone; the worker's supervisor restarts it."""
        pids = subprocess.run(["pgrep", "-g", str(self.process.pid), "-f", "infer cpu@"],
                              capture_output=True, text=True).stdout.split()
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)

    def is_alive(self, timeout_s: float = 60) -> bool:
        """The worker's supervisor runs, and so does an infer process under it (waited for up to `timeout_s`: one
        that died last is being restarted)."""
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None and time.monotonic() < deadline:
            if _answers(["pgrep", "-g", str(self.process.pid), "-f", "infer cpu@"]):
                return True
            time.sleep(0.5)
        return False

    def restarts(self) -> list[str]:
        """The supervisor's lines about the children it restarted, so far."""
        return [line for line in self.log_path.read_text(errors="replace").splitlines() if "; restarting in" in line]

    def kill_all(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


@dataclass
class Outcome:
    fault: str
    num_jobs: int
    states: dict[str, int]
    failures: dict[str, str]  # name -> error code
    injected_after_done: int  # jobs done when the fault was injected
    recovery_s: float  # from the fault's end to the last job's end
    total_s: float
    lost_runs: dict[str, int]  # name -> runs it lost to a dead worker process, for the jobs that lost any
    restarts: int  # worker processes the supervisor restarted during the run
    restarts_charged: int  # of which a job running alone killed (counted toward neither giving up nor delays)
    violations: list[str] = field(default_factory=list)


def write_documents(folder: Path, count: int, poisons: int) -> None:
    """`count` small contracts (their text names the folder's parent, so that the runs of one rig share no
    document), and `poisons` documents that kill their worker."""
    folder.mkdir(parents=True)
    run = folder.parent.name
    for i in range(count):
        (folder / f"contract_{i:03d}.txt").write_text(
            f"Services agreement no. {i} ({run}) between Party {i} Ltd and Client {i + 1} plc, dated {1 + i % 28} "
            f"March 2024. The supplier delivers item {i} within {10 + i} days; payment within 30 days.")
    for k in range(poisons):
        (folder / f"hostile_{k}.txt").write_text(f"A document that kills its worker ({run}, {k}): {POISON}.")


class Rig:
    """Services and a worker of their own for one or more runs: redis-server with AOF, a PostgreSQL cluster,
    `docbatch worker` with the poison failpoint armed (inert where no document holds the marker)."""

    def __init__(self, workdir: Path, base: Settings) -> None:
        self.workdir = workdir
        self.redis, self.postgres = Redis(workdir / "redis"), Postgres()
        self.settings = base.model_copy(update={
            "broker_url": self.redis.url, "database_url": self.postgres.url,
            "failpoints": (f"infer_claimed={POISON}",)})
        self.store: Store | None = None
        self.worker = Worker(self.settings, workdir / "worker.log")

    def __enter__(self) -> "Rig":
        self.redis.start()
        try:
            self.postgres.start(create=True)
            self.store = Store(self.settings.effective_database_url)
            self.store.migrate()
            self.worker.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_) -> None:
        self.worker.stop()
        self.redis.kill()
        if self.store is not None:
            self.store.close()
        self.postgres.remove()


def run_fault(fault: str, rig: Rig, num_docs: int, seed: int) -> Outcome:
    """One run on `rig`: `num_docs` documents of their own (and the poison ones for `poison`, `two_poisons`),
    `fault` injected once at a random point, the invariants checked once every job has ended."""
    rng = random.Random(seed)
    store, worker = rig.store, rig.worker
    folder = rig.workdir / fault / "docs"
    write_documents(folder, num_docs, POISONS.get(fault, 0))
    restarts_before = len(worker.restarts())
    started = time.monotonic()
    batch_id = _submit(rig.settings, store, folder)
    # a random point of the run: once between none and half of the jobs are done (a poison is there from the start)
    threshold = 0 if fault in POISONS else rng.randint(0, num_docs // 2)
    _wait_for(lambda: _count(store, batch_id, JobState.DONE) >= threshold and (
        threshold or _count(store, batch_id, JobState.RUNNING)), "the run to reach its fault", timeout_s=600)
    done_before = _count(store, batch_id, JobState.DONE)
    fault_ended = _inject(fault, worker, rig.redis, rig.postgres, rng)
    _wait_for(lambda: _all_ended(store, batch_id), "every job to end", timeout_s=900)
    ended = time.monotonic()
    outcome = _outcome(fault, store, batch_id, done_before, ended - fault_ended, ended - started)
    if not worker.is_alive():
        outcome.violations.append("the worker stopped: its supervisor gave up")
    restarts = worker.restarts()[restarts_before:]
    outcome.restarts, outcome.restarts_charged = len(restarts), sum("killed by the job" in line for line in restarts)
    return outcome


def _inject(fault: str, worker: Worker, redis: Redis, postgres: Postgres, rng: random.Random) -> float:
    """Inject `fault`; returns when it ended (the worker or service back), as time.monotonic()."""
    if fault == "kill_infer":
        worker.kill_infer()
    elif fault == "kill_worker":
        worker.kill_all()
        time.sleep(rng.uniform(1, 5))
        worker.start()
    elif fault in ("redis_restart", "redis_wiped"):
        redis.kill(lose_data=fault == "redis_wiped")
        time.sleep(rng.uniform(2, 10))
        redis.start()
    elif fault == "database_down":
        postgres.stop()
        time.sleep(30)
        postgres.start()
    elif fault not in POISONS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    return time.monotonic()


def _submit(settings: Settings, store: Store, folder: Path) -> str:
    from rich.console import Console

    from producer.intake.submit import Source, submit
    from schemas.tasks import builtin_task

    result = submit(settings, store, make_celery(settings), Source(paths=(folder,)),
                    builtin_task("summarize", settings), console=Console(file=io.StringIO()))
    return result.batch.batch_id


def _count(store: Store, batch_id: str, state: JobState) -> int:
    return store.batch_counts(batch_id).get(state, 0)


def _all_ended(store: Store, batch_id: str) -> bool:
    try:
        finished, total = store.unit_counts(batch_id)
    except Exception:  # noqa: BLE001 - the database may be away during the fault
        return False
    return finished == total


def _outcome(fault: str, store: Store, batch_id: str, done_before: int, recovery_s: float, total_s: float) -> Outcome:
    rows = store.batch_rows(batch_id)
    states: dict[str, int] = {}
    for _, job, _ in rows:
        states[job.state.value] = states.get(job.state.value, 0) + 1
    failures = {item.name: job.error_code for item, job, _ in rows if job.state == JobState.FAILED}
    lost_runs = {item.name: job.lost_runs for item, job, _ in rows if job.lost_runs}
    outcome = Outcome(fault, len(rows), states, failures, done_before, round(recovery_s, 1), round(total_s, 1),
                      lost_runs, restarts=0, restarts_charged=0)
    outcome.violations = check_invariants(store, batch_id, expect_failed={
        f"docs/hostile_{k}.txt" for k in range(POISONS.get(fault, 0))})
    return outcome


def check_invariants(store: Store, batch_id: str, expect_failed: set[str]) -> list[str]:
    """What must hold after any fault: every job ended; only the expected documents failed (a poison one
    with too_many_attempts); every done job has its one result; no job ran more often than its lost runs
    explain (nothing was answered twice); no other job lost more than one run (the one a dead process cost it:
    from then on it runs alone)."""
    from sqlalchemy import func, select

    violations = []
    rows = store.batch_rows(batch_id)
    for item, job, result in rows:
        if not job.state.is_terminal:
            violations.append(f"{item.name}: still {job.state.value}")
        if job.state == JobState.FAILED and item.name not in expect_failed:
            violations.append(f"{item.name}: failed ({job.error_code}: {job.error_message})")
        if item.name in expect_failed and (job.state, job.error_code) != (JobState.FAILED, "too_many_attempts"):
            violations.append(f"{item.name}: {job.state.value} ({job.error_code}), expected too_many_attempts")
        if job.state == JobState.DONE and result is None:
            violations.append(f"{item.name}: done without a result")
        if job.attempts > job.lost_runs + 1:
            violations.append(f"{item.name}: ran {job.attempts} times with {job.lost_runs} lost runs")
        if item.name not in expect_failed and job.lost_runs > 1:
            violations.append(f"{item.name}: lost {job.lost_runs} runs")
    with store._sessions() as session:
        extra = session.scalar(select(func.count()).select_from(Result).join(Job, Job.id == Result.job_id)
                               .where(Job.state != JobState.DONE, Job.state != JobState.FAILED))
    if extra:
        violations.append(f"{extra} results belong to jobs that are not done")
    return violations


def fault_settings(home: Path, model: str | None = None) -> Settings:
    """Short leases and sweeps so that a run recovers in seconds; small answers so that it runs in seconds.
    `home` keeps the converted model between runs."""
    return Settings(home=home, model=model or Settings().model, device="cpu", lease_s=4, sweep_interval_s=1,
                    message_grace_s=3, visibility_timeout_s=60, max_new_tokens=32, ignore_eos=True,
                    max_batch_size=16, max_attempts=2, metrics_port=0, prepare_concurrency=2, max_inflight=64)


def _answers(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True).returncode == 0


def _wait_for(condition: Callable[[], object], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--faults", default="all", help=f"comma-separated: {', '.join(FAULTS)}, or all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    faults = FAULTS if args.faults == "all" else tuple(args.faults.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for i, fault in enumerate(faults):
        with Rig(args.out / f"{i}-{fault}", fault_settings(args.out / "home")) as rig:
            outcome = run_fault(fault, rig, args.docs, args.seed + i)
        outcomes.append(asdict(outcome))
        print(json.dumps(outcomes[-1]), flush=True)
    (args.out / "outcomes.json").write_text(json.dumps(outcomes, indent=1))
    sys.exit(1 if any(o["violations"] for o in outcomes) else 0)


if __name__ == "__main__":
    main()
