"""The HTTP API's own overhead, no worker running: how long a 50,000-line batch takes from `batches.create` to
`in_progress` (and until its 50,000 messages are in Redis), and how many `retrieve` requests a second one API process
answers, through the real `openai` SDK.

    .venv/bin/python benchmarks/api_overhead.py [--lines 50000] [--broker-url redis://127.0.0.1:6379/14]
                                                [--database-url URL] [--seconds 10] [--clients 4]

Baselines from the same run: `docbatch submit --openai-batch` of the same file (the CLI's path to the same jobs),
and requests the API refuses before any database read (no key: 401), the framework's own floor. `retrieve` is
measured on the 50,000-job batch with counts cached (`api_refresh_s` 2, the default) and recomputed on every request
(`api_refresh_s` 0). The broker database given is flushed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from producer.api.auth import new_key  # noqa: E402
from producer.service.embedded import free_port  # noqa: E402
from schemas.settings import Settings  # noqa: E402
from schemas.sql.store import Store  # noqa: E402


def request_line(i: int) -> str:
    body = {"model": "any", "messages": [{"role": "user", "content": f"Summarize item {i} in one line."}],
            "max_tokens": 16}
    return json.dumps({"custom_id": f"req-{i:06d}", "method": "POST", "url": "/v1/chat/completions", "body": body})


def start_api(settings: Settings, log: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "api"], env={**os.environ, **settings.to_env()},
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{settings.api_port}/v1/batches", timeout=2)
        except urllib.error.HTTPError:
            return process
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"the API did not start; see {log}")


def rate(call, clients: int, seconds: float) -> float:
    """Calls a second, `clients` threads calling `call` in a loop for `seconds`."""
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def loop(slot: int) -> None:
        while time.monotonic() < stop:
            call()
            counts[slot] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def queued_messages(client: redis.Redis) -> int:
    return sum(client.llen(key) for key in client.scan_iter("prepare*") if client.type(key) == b"list")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    broker = redis.Redis.from_url(args.broker_url)
    broker.flushdb()
    home = Path(tempfile.mkdtemp(prefix="api-bench-"))
    settings = Settings(home=home, database_url=args.database_url, broker_url=args.broker_url, api_port=free_port(),
                        api_max_requests=max(args.lines, 50_000), api_sweep_interval_s=1)
    store = Store(settings.effective_database_url)
    store.migrate()
    key = new_key()
    store.add_api_key(key.key_id, "bench", key.secret_sha256)
    requests_path = home / "requests.jsonl"
    requests_path.write_text("\n".join(request_line(i) for i in range(args.lines)) + "\n")
    print(f"{args.lines} lines, {requests_path.stat().st_size / 1e6:.1f} MB; database "
          f"{settings.effective_database_url.split(':')[0]}; {os.cpu_count()} cores")

    # Baseline: the CLI's path to the same jobs
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "producer.cli", "submit", "--openai-batch", str(requests_path)],
                   env={**os.environ, **settings.to_env()}, check=True, capture_output=True)
    print(f"baseline docbatch submit --openai-batch: {time.monotonic() - start:.1f} s")
    broker.flushdb()

    for refresh_s in (2.0, 0.0):
        run = settings.model_copy(update={"api_refresh_s": refresh_s, "api_port": free_port()})
        api_process = start_api(run, home / f"api-{refresh_s}.log")
        try:
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{run.api_port}/v1", api_key=key.token, max_retries=0,
                                timeout=600)
            if refresh_s:
                start = time.monotonic()
                source = api.files.create(file=requests_path.open("rb"), purpose="batch")
                uploaded = time.monotonic()
                batch = api.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
                created = time.monotonic()
                while (batch := api.batches.retrieve(batch.id)).status == "validating":
                    time.sleep(0.05)
                in_progress = time.monotonic()
                while queued_messages(broker) < args.lines:
                    time.sleep(0.05)
                sent = time.monotonic()
                print(f"upload {uploaded - start:.1f} s; create answered in {(created - uploaded) * 1000:.0f} ms; "
                      f"in_progress after {in_progress - created:.1f} s (status {batch.status}, "
                      f"{batch.request_counts.total} requests); every message in Redis after {sent - created:.1f} s")
                floor = rate(lambda: _refused(run), args.clients, args.seconds)
                print(f"baseline 401 (no key, no database read): {floor:.0f} requests/s with {args.clients} clients")
            retrieve = rate(lambda: api.batches.retrieve(batch.id), args.clients, args.seconds)
            print(f"retrieve of the {args.lines}-request batch, api_refresh_s={refresh_s:g}: {retrieve:.0f} requests/s "
                  f"with {args.clients} clients")
        finally:
            api_process.terminate()
            api_process.wait(60)
    broker.flushdb()


def _refused(settings: Settings) -> None:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{settings.api_port}/v1/batches", timeout=10)
    except urllib.error.HTTPError:
        pass


if __name__ == "__main__":
    main()
