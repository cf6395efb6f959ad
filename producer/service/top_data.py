"""What `docbatch top` shows, gathered from the three places that know it: the broker (each worker's answer
to `inspect docbatch_telemetry`, and the queues' lengths in Redis), the workers' metrics endpoints, and
the store (the newest batches)."""
from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from producer.results.progress import batch_status
from schemas.broker_state import UNACKED_HASH, queue_keys
from schemas.messages import INFER_QUEUE, PREPARE_QUEUE, PRIORITY_STEPS
from schemas.records import BatchStatus
from schemas.sql.store import Store

SCRAPE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    return [Sample(s.name, s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples]


def scrape(url: str) -> list[Sample] | str:
    """A worker's metrics, or why they could not be read."""
    try:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            return parse_metrics(response.read().decode())
    except (urllib.error.URLError, OSError) as e:
        return f"unreachable: {getattr(e, 'reason', e)}"


def total(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of the samples called `name` that carry `labels`; None when there is none."""
    values = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(values) if values else None


@dataclass
class WorkerView:
    name: str
    info: dict[str, Any]  # the worker's answer to `inspect docbatch_telemetry`
    samples: list[Sample] = field(default_factory=list)
    scrape_error: str | None = None
    tokens_out_per_s: float | None = None  # from this scrape and the one before

    @property
    def jobs_done(self) -> float | None:
        return self._count("docbatch_jobs_done_total")

    @property
    def jobs_failed(self) -> float | None:
        return self._count("docbatch_jobs_failed_total")

    def _count(self, name: str) -> float | None:
        """A counter's total; 0 for a worker whose metrics have none of it yet, None without metrics."""
        found = total(self.samples, name)
        return found if found is not None or not self.samples else 0.0

    @property
    def alerts(self) -> list[str]:
        return [f"{s.labels['alert']}({s.labels['subject']})" for s in self.samples
                if s.name == "docbatch_alert" and s.value >= 1]

    @property
    def gpus(self) -> dict[str, dict[str, float]]:
        """GPU index -> {metric name without its prefix: value}."""
        found: dict[str, dict[str, float]] = {}
        for s in self.samples:
            if s.name.startswith("docbatch_gpu_"):
                found.setdefault(s.labels["gpu"], {})[s.name.removeprefix("docbatch_gpu_")] = s.value
        return found


@dataclass(frozen=True)
class BatchView:
    status: BatchStatus
    label: str | None
    task: str
    units_finished: int
    units_total: int


@dataclass
class TopData:
    workers: list[WorkerView]
    queues: dict[str, int]  # queue -> messages waiting; "unacked" -> delivered, not yet acknowledged
    batches: list[BatchView]
    taken_at_s: float


def queue_lengths(client: redis.Redis) -> dict[str, int]:
    """Messages waiting in each docbatch queue (all its priority lists), and those delivered but not acked."""
    pipe = client.pipeline()
    for queue in (PREPARE_QUEUE, INFER_QUEUE):
        for key in queue_keys(queue):
            pipe.llen(key)
    pipe.hlen(UNACKED_HASH)
    counts = pipe.execute()
    steps = len(PRIORITY_STEPS)
    return {PREPARE_QUEUE: sum(counts[:steps]), INFER_QUEUE: sum(counts[steps:2 * steps]), "unacked": counts[-1]}


def workers(app: Celery, timeout_s: float) -> list[WorkerView]:
    replies = app.control.inspect(timeout=timeout_s)._request("docbatch_telemetry") or {}
    return [WorkerView(name, info) for name, info in sorted(replies.items()) if isinstance(info, dict)]


def engines_tokens_out(app: Celery, timeout_s: float = 1.0) -> float | None:
    """The tokens every worker's engine has generated (their `docbatch_engine_tokens_out_total`, summed), or None
    when no worker with a metrics endpoint answers: what `--wait` shows so that a working batch never looks hung."""
    found = [total(samples, "docbatch_engine_tokens_out_total") for samples in
             (scrape(view.info["metrics_url"]) for view in workers(app, timeout_s) if view.info.get("metrics_url"))
             if isinstance(samples, list)]
    found = [value for value in found if value is not None]
    return sum(found) if found else None


def batches(store: Store, limit: int) -> list[BatchView]:
    views = []
    for batch_id in store.latest_batch_ids(limit):
        batch = store.get_batch(batch_id)
        finished, units = store.unit_counts(batch_id)
        views.append(BatchView(batch_status(store, batch_id), batch.label, batch.task, finished, units))
    return views


def gather(app: Celery, client: redis.Redis, store: Store, *, now_s: float, previous: TopData | None = None,
           timeout_s: float = 1.0, num_batches: int = 8) -> TopData:
    """One look at the whole system; rates come from `previous` (the look before), when there is one."""
    data = TopData(workers(app, timeout_s), queue_lengths(client), batches(store, num_batches), now_s)
    before = {w.name: w for w in previous.workers} if previous else {}
    for worker in data.workers:
        url = worker.info.get("metrics_url")
        scraped = scrape(url) if url else "no metrics endpoint"
        worker.samples, worker.scrape_error = (scraped, None) if isinstance(scraped, list) else ([], scraped)
        earlier = before.get(worker.name)
        tokens, tokens_before = (total(w.samples, "docbatch_engine_tokens_out_total") if w else None
                                 for w in (worker, earlier))
        if tokens is not None and tokens_before is not None and now_s > previous.taken_at_s:
            worker.tokens_out_per_s = (tokens - tokens_before) / (now_s - previous.taken_at_s)
    return data
