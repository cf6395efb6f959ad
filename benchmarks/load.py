"""A load test of the whole service around the engine: many small documents, real Redis and PostgreSQL, the
product's own worker processes with the instant engine of `pipeline_ceiling.py` (the real paged engine's
scheduler, blocks and futures around a runner that answers at once).

    python benchmarks/load.py --docs 100000 --batch-docs 10000 --producers 2 --out /tmp/load
    python benchmarks/load.py --docs 20000 ... --faults    # kill -9 an infer worker, then Redis, mid-drain

It writes the documents (small contracts, each unique) in folders of --batch-docs, starts a redis-server of its own
on a free port (AOF on, everysec, so that a restart keeps what it had), creates a fresh PostgreSQL database (dropped
at the end), starts 4 worker processes (2 prepare, 2 infer), then has --producers `docbatch submit` processes
submit the folders at once, each its share one after the other. While the backlog drains it samples, every
--sample-s: the jobs by state (SQL), each queue's depth (Redis), each process's memory. Each worker process records
every pass of its sweep (duration, SQL statements and their time) and every result it stores. With --faults, once
40 % of the jobs have ended an infer worker is killed with SIGKILL (restarted 5 s later, as its supervisor would),
and at 60 % redis-server is killed with SIGKILL and started again on its AOF 3 s later.

Checks at the end: every job terminal, no job with two stored results, as many results as done jobs. The summary
(JSON) goes to stdout and OUT/summary.json; the samples and sweep passes stay in OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from faults.harness import Redis  # noqa: E402 - the fault suite's redis-server with AOF, on a free port
from schemas.settings import Settings  # noqa: E402

WORKERS = (("prepare", "prepare1@load"), ("prepare", "prepare2@load"), ("infer", "instant1@load"),
           ("infer", "instant2@load"))
KILLED_WORKER = "instant1@load"
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# -- inside a worker process: the instant engine and the probes -------------------------------------------------------
def serve(role: str, name: str, probe_dir: Path) -> None:
    """This file as a worker process: `worker.service.process` with probes, and for infer the instant engine."""
    import worker.service.process
    from pipeline_ceiling import serve_infer

    install_probes(probe_dir / f"{name}.jsonl")
    if role == "infer":
        serve_infer(name)
    else:
        worker.service.process.main(role, name)


def install_probes(path: Path) -> None:
    """Record, one JSON line each, every sweep pass of this process (wall time, SQL statements and their time) and
    every result it stores (the job id), and every delivery that found its job already taken or ended."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    import worker.service.reconcile as reconcile
    from schemas.sql.store import Store

    out = open(path, "a", buffering=1)  # a line per write, appended: a prepare child writes through the same file
    lock, local = threading.Lock(), threading.local()

    def write(record: dict) -> None:
        with lock:
            out.write(json.dumps(record) + "\n")

    @event.listens_for(Engine, "before_cursor_execute")
    def _before(*_):
        local.started = time.perf_counter()

    @event.listens_for(Engine, "after_cursor_execute")
    def _after(*_):
        if getattr(local, "sql", None) is not None:
            local.sql[0] += 1
            local.sql[1] += time.perf_counter() - local.started

    sweep, finish, claim = reconcile.sweep, Store.finish, Store.claim

    def timed_sweep(*args, **kwargs):
        local.sql, started, counts = [0, 0.0], time.perf_counter(), None
        try:
            counts = sweep(*args, **kwargs)
            return counts
        finally:
            write({"event": "sweep", "t": time.time(), "pid": os.getpid(), "s": time.perf_counter() - started,
                   "statements": local.sql[0], "sql_s": local.sql[1], "actions": dict(counts or {}),
                   "ok": counts is not None})
            local.sql = None

    def probed_finish(self, job_id, *args, **kwargs):
        done = finish(self, job_id, *args, **kwargs)
        if done:
            write({"event": "finish", "job": job_id})
        return done

    def probed_claim(self, job_id, from_state, *args, **kwargs):
        job = claim(self, job_id, from_state, *args, **kwargs)
        if job is None:
            write({"event": "claim_missed", "job": job_id, "from": str(from_state)})
        return job

    reconcile.sweep, Store.finish, Store.claim = timed_sweep, probed_finish, probed_claim


# -- the parts the benchmark runs ------------------------------------------------------------------------------------
def write_documents(folder: Path, num_docs: int, batch_docs: int) -> list[Path]:
    """`num_docs` unique small contracts in folders of `batch_docs`; returns the folders."""
    folders = []
    for start in range(0, num_docs, batch_docs):
        batch = folder / f"b{start // batch_docs:03d}"
        batch.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(start + batch_docs, num_docs)):
            (batch / f"c{i:06d}.txt").write_text(f"Agreement {i} between Alpha {i} Ltd and Beta plc. Term: "
                                                 f"{1 + i % 5} years. Fee: {1000 + i} EUR. Governed by the laws "
                                                 f"of England.\n")
        folders.append(batch)
    return folders


@contextmanager
def fresh_database():
    """The SQLAlchemy URL of a new PostgreSQL database, dropped afterwards."""
    import psycopg

    name = f"docbatch_load_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM: the peak) of a process, in kB; (0, 0) once it is gone."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line[:5]] = int(line.split()[1])
    except OSError:
        pass
    return found.get("VmRSS", 0), found.get("VmHWM", 0)


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(p) for p in listing.read().split()]
    except OSError:
        return []


class Workers:
    """The 4 worker processes, each its own log; peak memory kept per process (its pool's children apart)."""

    def __init__(self, env: dict[str, str], out: Path) -> None:
        self.env, self.out = env, out
        self.processes = {name: self._start(role, name) for role, name in WORKERS}
        self.roles = dict((name, role) for role, name in WORKERS)
        self.peak_kb: Counter[str] = Counter()

    def _start(self, role: str, name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--worker", role, name, "--out", str(self.out)],
                                env=self.env, stdout=open(self.out / "logs" / f"{name}.log", "ab"),
                                stderr=subprocess.STDOUT)

    def sample(self) -> dict[str, int]:
        """Keep each process's peak; returns the worker processes' resident memory now, in MB."""
        now = {}
        for name, process in self.processes.items():
            rss_kb, peak_kb = memory_kb(process.pid)
            now[name] = round(rss_kb / 1024)
            self.peak_kb[name] = max(self.peak_kb[name], peak_kb)
            for i, child in enumerate(children_of(process.pid)):
                key = f"{name} child {i + 1}"
                self.peak_kb[key] = max(self.peak_kb[key], memory_kb(child)[1])
        return now

    def kill_and_restart(self, name: str, down_s: float) -> None:
        self.sample()
        self.processes[name].kill()
        self.processes[name].wait()
        time.sleep(down_s)
        self.peak_kb[f"{name} (before kill -9)"] = self.peak_kb.pop(name)
        self.processes[name] = self._start(self.roles[name], name)

    def stop(self) -> None:
        self.sample()
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


class Producers:
    """`docbatch submit` of every folder, `num_producers` processes at once, each its share in turn, started now;
    `records` gets one record per submit (folder, batch, seconds, peak memory)."""

    def __init__(self, folders: list[Path], num_producers: int, env: dict[str, str], out: Path) -> None:
        self.records, self.running = [], {}
        self._lock, self._stopping = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._produce, args=(i, folders[i::num_producers], env, out))
                         for i in range(num_producers)]
        for thread in self._threads:
            thread.start()

    @property
    def is_alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def _produce(self, index: int, folders: list[Path], env: dict[str, str], out: Path) -> None:
        for folder in folders:
            if self._stopping.is_set():
                return
            started = time.time()
            process = subprocess.Popen([sys.executable, "-m", "producer.cli", "submit", str(folder), "--task",
                                        "summarize"], env=env, stdout=subprocess.PIPE,
                                       stderr=open(out / "logs" / f"producer{index + 1}.log", "ab"), text=True)
            self.running[index] = process
            peak_kb = 0
            while process.poll() is None:
                peak_kb = max(peak_kb, memory_kb(process.pid)[1])
                time.sleep(0.2)
            batch = process.stdout.read().split()
            with self._lock:
                self.records.append({"producer": index + 1, "folder": folder.name, "rc": process.returncode,
                                     "batch": batch[0] if batch else None, "start": started, "end": time.time(),
                                     "docs": sum(1 for _ in folder.iterdir()), "peak_rss_mb": round(peak_kb / 1024)})

    def stop(self) -> None:
        """Start no more submits, end the running ones, wait for the threads."""
        self._stopping.set()
        for process in self.running.values():
            if process.poll() is None:
                process.terminate()
        for thread in self._threads:
            thread.join()


def sample_once(engine, client, started: float) -> dict:
    """The jobs by state (SQL) and each queue's messages (Redis: listed, delivered unacknowledged) now."""
    from sqlalchemy import text

    from schemas.broker_state import read_queue
    from schemas.messages import INFER_QUEUE, PREPARE_QUEUE

    with engine.connect() as conn:
        states = dict(conn.execute(text("SELECT state, count(*) FROM jobs GROUP BY state")).all())
    sample = {"t": round(time.time() - started, 1), "jobs": {str(k): v for k, v in states.items()}}
    try:
        sample["redis_mb"] = round(client.info("memory")["used_memory"] / 2**20, 1)
        for queue in (PREPARE_QUEUE, INFER_QUEUE):
            state = read_queue(client, queue)
            sample[queue] = {"listed": state.num_listed, "delivered": len(state.delivered)}
    except Exception as e:  # noqa: BLE001 - Redis down (the fault phase): said in the sample
        sample["redis"] = type(e).__name__
    return sample


TERMINAL = ("done", "failed", "cancelled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--batch-docs", type=int, default=10_000)
    parser.add_argument("--producers", type=int, default=2)
    parser.add_argument("--faults", action="store_true", help="kill -9 an infer worker and Redis mid-drain")
    parser.add_argument("--sample-s", type=float, default=2.0)
    parser.add_argument("--drain-timeout-s", type=float, default=7200)
    parser.add_argument("--sweep-scale", type=lambda v: [int(n) for n in v.split(",")], metavar="N,N,...",
                        help="only time sweep passes over seeded backlogs of these sizes (no workers, no submit)")
    parser.add_argument("--out", type=Path, default=Path("load-out"))
    parser.add_argument("--worker", nargs=2, metavar=("ROLE", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(*args.worker, args.out / "probes")
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a stopped benchmark still drops its database
    if args.sweep_scale:
        (args.out / "probes").mkdir(parents=True, exist_ok=True)
        print(json.dumps(sweep_scale(args), indent=1))
        return
    for sub in ("logs", "probes"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    folders = write_documents(args.out / "docs", args.docs, args.batch_docs)
    redis_server = Redis(args.out / "redis")
    redis_server.start()
    try:
        with fresh_database() as database_url:
            summary = drive(args, folders, redis_server, database_url)
    finally:
        redis_server.kill()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def drive(args, folders: list[Path], redis_server: Redis, database_url: str) -> dict:
    import redis
    from sqlalchemy import text

    from schemas.sql.store import Store

    settings = Settings(home=args.out / "home", broker_url=redis_server.url,
                        database_url=database_url, ignore_eos=True, max_new_tokens=16, max_batch_size=32,
                        max_inflight=32, prepare_concurrency=1, metrics_port=0)
    store = Store(database_url)
    store.migrate()
    env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
    client = redis.Redis(port=redis_server.port, socket_timeout=5)
    (args.out / "ps_at_start.txt").write_text(top_processes())
    started = time.time()
    workers = Workers(env, args.out)
    producers = Producers(folders, args.producers, env, args.out)
    try:
        samples, faults = drain(args, store, client, workers, producers, redis_server, started)
        drained = time.time()
        (args.out / "ps_at_end.txt").write_text(top_processes())
    finally:  # an interrupted or timed-out run leaves no process behind
        producers.stop()
        workers.stop()
    with store.engine.connect() as conn:
        sizes = dict(conn.execute(text(
            "SELECT 'database', pg_database_size(current_database()) UNION ALL "
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname IN "
            "('jobs', 'documents', 'results', 'batch_items', 'pages')")).all())
        checks = conn.execute(text(
            "SELECT count(*) FILTER (WHERE state NOT IN ('done', 'failed', 'cancelled')), "
            "count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE attempts > 1), "
            "(SELECT count(*) FROM results) FROM jobs")).one()
    store.close()
    return summarise(args, producers.records, samples, faults, started, drained, workers, sizes, checks)


def drain(args, store, client, workers: Workers, producers: Producers, redis_server: Redis,
          started: float) -> tuple[list[dict], list[dict]]:
    """Sample every --sample-s until every job has ended (or --drain-timeout-s), injecting the faults on the way;
    returns the samples and the faults."""
    samples, faults = [], []
    with open(args.out / "samples.jsonl", "w", buffering=1) as sample_log:
        while True:
            time.sleep(args.sample_s)
            rss_mb = workers.sample()
            sample = sample_once(store.engine, client, started) | {"rss_mb": rss_mb}
            samples.append(sample)
            sample_log.write(json.dumps(sample) + "\n")
            ended = sum(sample["jobs"].get(state, 0) for state in TERMINAL)
            if not producers.is_alive and ended == sum(sample["jobs"].values()):
                return samples, faults
            if time.time() - started > args.drain_timeout_s:
                faults.append({"t": sample["t"], "what": "drain timeout: stopped waiting"})
                return samples, faults
            if args.faults and not faults and ended >= 0.4 * args.docs:
                held = store_held(store, KILLED_WORKER)
                workers.kill_and_restart(KILLED_WORKER, down_s=5)
                faults.append({"t": sample["t"], "what": f"kill -9 {KILLED_WORKER} (holding {held} jobs), "
                                                         "restarted 5 s later"})
            elif args.faults and len(faults) == 1 and ended >= 0.6 * args.docs:
                redis_server.kill()  # its AOF stays: restarted on it, as a crashed Redis comes back
                time.sleep(3)
                redis_server.start()
                faults.append({"t": sample["t"], "what": "kill -9 redis-server, restarted on its AOF 3 s later"})


def sweep_scale(args) -> dict:
    """One sweep pass (the product's `sweep`, probed) over a backlog of N queued jobs seeded straight into a fresh
    database, for each N of --sweep-scale: with every message in Redis (the queue's list holds N entries: nothing is
    missing), and after Redis lost them all (the pass re-sends at most MAX_RESEND_PER_SWEEP)."""
    import redis
    from sqlalchemy import text

    import worker.service.reconcile as reconcile
    from schemas.messages import PREPARE_QUEUE, make_celery
    from schemas.sql.store import Store

    probes = args.out / "probes" / "sweep_scale.jsonl"
    install_probes(probes)
    redis_server, figures = Redis(args.out / "redis"), []
    redis_server.start()
    client = redis.Redis(port=redis_server.port)
    try:
        for num_jobs in args.sweep_scale:
            with fresh_database() as database_url:
                settings = Settings(home=args.out / "home", broker_url=redis_server.url, database_url=database_url)
                store, app = Store(database_url), make_celery(settings)
                store.migrate()
                seeded = time.perf_counter()
                with store.engine.begin() as conn:
                    conn.execute(text("INSERT INTO documents (sha256, size_bytes, media_type, content, created_at) "
                                      "VALUES (repeat('0', 64), 1, 'text/plain', '\\x30', now())"))
                    conn.execute(text(
                        "INSERT INTO jobs (id, idempotency_key, document_sha256, task, params, model, state, priority, "
                        "attempts, lost_runs, isolate, chunks_done, created_at, updated_at, sent_at) "
                        "SELECT md5(i::text), md5('k' || i), repeat('0', 64), 'summarize', '{}', 'm', 'queued', 5, 0, "
                        "0, false, 0, now(), now(), now() - interval '1 hour' FROM generate_series(1, :n) AS i"),
                        {"n": num_jobs})
                    conn.execute(text("ANALYZE jobs"))
                seeded = time.perf_counter() - seeded
                client.flushall()
                for start in range(0, num_jobs, 10_000):
                    client.rpush(PREPARE_QUEUE, *["x"] * min(10_000, num_jobs - start))
                for _ in range(3):
                    reconcile.sweep(store, settings, app, client)
                client.flushall()  # Redis lost every message
                empty_bytes = client.info("memory")["used_memory"]
                reconcile.sweep(store, settings, app, client)
                grown_bytes = client.info("memory")["used_memory"] - empty_bytes
                store.close()
            passes = [json.loads(line) for line in probes.read_text().splitlines()][-4:]
            figures.append({"backlog": num_jobs, "seed_s": round(seeded, 1),
                            "pass_s": [round(p["s"], 3) for p in passes[:3]],
                            "pass_sql_s": [round(p["sql_s"], 3) for p in passes[:3]],
                            "statements": passes[0]["statements"],
                            "after_redis_lost_all": {"s": round(passes[3]["s"], 2), "actions": passes[3]["actions"],
                                                     "redis_bytes_per_message": round(
                                                         grown_bytes / max(1, passes[3]["actions"].get("resent", 0)))}})
    finally:
        redis_server.kill()
    return {"sweep_scale": figures}


def top_processes() -> str:
    """What else runs on this machine (the figures depend on it): the busiest processes and the load average."""
    listing = subprocess.run(["ps", "-eo", "pcpu,rss,etime,args", "--sort=-pcpu"], capture_output=True, text=True)
    return f"load average {os.getloadavg()}\n" + "\n".join(line[:200] for line in listing.stdout.splitlines()[:30])


def steady_rate(samples: list[dict]) -> float | None:
    """Jobs ended per second between 10 % and 90 % of them ended: the drain's pace without start-up and tail."""
    points = [(s["t"], sum(s["jobs"].get(k, 0) for k in TERMINAL), sum(s["jobs"].values())) for s in samples]
    total = points[-1][2] if points else 0
    low = next((p for p in points if p[1] >= 0.1 * total), None)
    high = next((p for p in points if p[1] >= 0.9 * total), None)
    if not low or not high or high[0] <= low[0]:
        return None
    return round((high[1] - low[1]) / (high[0] - low[0]), 1)


def store_held(store, name: str) -> int:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs WHERE state IN ('preparing', 'running') "
                                 "AND worker = :name"), {"name": name}).scalar()


def probe_events(out: Path) -> tuple[list[dict], Counter[str], Counter[str]]:
    """Every sweep pass (with its process's name), results stored per job, deliveries that found their job gone."""
    sweeps, finishes, missed = [], Counter(), Counter()
    for path in sorted((out / "probes").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:  # a line cut off by kill -9
                continue
            if event["event"] == "sweep":
                sweeps.append({**event, "name": path.stem})
            elif event["event"] == "finish":
                finishes[event["job"]] += 1
            else:
                missed[event["from"]] += 1
    return sweeps, finishes, missed


def summarise(args, submits, samples, faults, started, drained, workers, sizes, checks) -> dict:
    sweeps, finishes, missed = probe_events(args.out)
    not_terminal, done, rerun, results = checks
    first_submit, last_submit = min(s["start"] for s in submits), max(s["end"] for s in submits)
    backlog = [(started + s["t"], sum(v for k, v in s["jobs"].items() if k not in TERMINAL)) for s in samples]

    def backlog_at(t: float) -> int:
        return min(backlog, key=lambda b: abs(b[0] - t))[1] if backlog else 0

    bins: dict[int, list[dict]] = {}
    step = max(1, args.docs // 10)
    for sweep in sweeps:
        bins.setdefault(backlog_at(sweep["t"]) // step * step, []).append(sweep)
    sweep_table = [{"backlog_from": low, "passes": len(group),
                    "median_s": round(statistics.median(g["s"] for g in group), 3),
                    "max_s": round(max(g["s"] for g in group), 3),
                    "median_statements": statistics.median(g["statements"] for g in group),
                    "median_sql_s": round(statistics.median(g["sql_s"] for g in group), 3),
                    "actions": dict(sum((Counter(g["actions"]) for g in group), Counter()))}
                   for low, group in sorted(bins.items())]
    return {
        "docs": args.docs, "batch_docs": args.batch_docs, "producers": args.producers, "faults": faults,
        "submit": {"docs_per_s_all": round(args.docs / (last_submit - first_submit), 1),
                   "per_submit": [{k: s[k] for k in ("producer", "folder", "rc", "docs", "peak_rss_mb")}
                                  | {"s": round(s["end"] - s["start"], 1),
                                     "docs_per_s": round(s["docs"] / (s["end"] - s["start"]), 1)} for s in submits],
                   "first_to_last_s": round(last_submit - first_submit, 1)},
        "drain": {"start_to_all_terminal_s": round(drained - started, 1),
                  "last_submit_to_all_terminal_s": round(drained - last_submit, 1),
                  "docs_per_s_overall": round(done / (drained - started), 1),
                  "docs_per_s_10_to_90_percent": steady_rate(samples)},
        "queue_depth_peak": {q: max((s.get(q, {}).get("listed", 0) for s in samples), default=0)
                             for q in ("prepare", "infer")},
        "backlog_peak": max((b for _, b in backlog), default=0),
        "sweeps": sweep_table,
        "postgres_mb": {k: round(v / 2**20, 1) for k, v in sizes.items()},
        "redis_used_memory_peak_mb": max((s.get("redis_mb", 0) for s in samples), default=0),
        "peak_rss_mb": {k: round(v / 1024) for k, v in sorted(workers.peak_kb.items())},
        "checks": {"jobs_not_terminal": not_terminal, "done": done, "results_rows": results,
                   "jobs_with_two_stored_results": sum(1 for n in finishes.values() if n > 1),
                   "results_stored_by_probes": sum(finishes.values()), "jobs_claimed_more_than_once": rerun,
                   "deliveries_finding_their_job_taken_or_ended": dict(missed)},
        "load_average_at_end": os.getloadavg(),
    }


if __name__ == "__main__":
    main()
