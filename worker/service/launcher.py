"""`docbatch worker`: one infer process per GPU (pinned with CUDA_VISIBLE_DEVICES before torch is
imported) plus one prepare process, run under `worker.service.supervisor`.

A GPU group (`--gpus 0+1`) runs one model over its GPUs in one process that sees them all: vLLM's tensor
parallelism (`tensor_parallel_size` = the group's size), or for the hf engine the model split by layers."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

from schemas.settings import Settings
from schemas.sql.lifecycle import Holder
from schemas.sql.store import Store
from worker.service.supervisor import Child, supervise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # "infer" or "prepare"
    name: str  # Celery node name, e.g. gpu0@host
    cuda_visible_devices: str | None  # None: leave unset; "" hides every GPU


def count_gpus() -> int:
    """GPUs on this host, asked of nvidia-smi so the launcher itself never initialises CUDA."""
    if shutil.which("nvidia-smi") is None:
        return 0
    listing = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, check=False)
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def plan_workers(gpus: str, num_gpus: int, host: str, with_prepare: bool = True) -> list[WorkerSpec]:
    """Worker processes for `--gpus`: `auto` (every GPU, else CPU), `all`, `cpu`, `0,1` (one process
    each), `0+1` (one model over both GPUs, one process owning both), or `none` (no inference: the prepare worker
    alone)."""
    if gpus == "auto":
        gpus = "all" if num_gpus else "cpu"
    if gpus == "none":
        if not with_prepare:
            raise ValueError("--gpus none --no-prepare leaves no worker to start")
        specs = []
    elif gpus == "cpu":
        specs = [WorkerSpec("infer", f"cpu@{host}", "")]
    else:
        groups = [str(i) for i in range(num_gpus)] if gpus == "all" else [g.strip() for g in gpus.split(",")]
        if not groups or any(not g for g in groups):
            raise ValueError(f"--gpus {gpus!r}: no GPU found (use --gpus cpu)" if gpus == "all"
                             else f"--gpus {gpus!r}: expected all, cpu, or indices like 0,1 or 0+1")
        for group in groups:
            for index in group.split("+"):
                if not index.isdigit() or int(index) >= num_gpus:
                    raise ValueError(f"--gpus {gpus!r}: GPU {index} does not exist ({num_gpus} found)")
        specs = [WorkerSpec("infer", f"gpu{group}@{host}", ",".join(group.split("+"))) for group in groups]
    if with_prepare:
        specs.append(WorkerSpec("prepare", f"prepare@{host}", ""))
    return specs


def _command(spec: WorkerSpec, env: dict[str, str]) -> Child:
    child_env = dict(env)
    if spec.cuda_visible_devices is not None:
        child_env["CUDA_VISIBLE_DEVICES"] = spec.cuda_visible_devices
    if spec.role == "infer" and spec.cuda_visible_devices == "":
        child_env["DOCBATCH_DEVICE"] = "cpu"
    return Child(spec.name, [sys.executable, "-m", "worker.service.process", spec.role, spec.name], child_env)


def launch(settings: Settings, gpus: str, with_prepare: bool = True) -> int:
    """Run the worker processes until a signal; returns the exit code (non-zero when a child could not be
    kept alive, so that systemd, compose or Kubernetes restart the whole worker)."""
    specs = plan_workers(gpus, count_gpus(), socket.gethostname(), with_prepare)
    # Each child serves its metrics on a port of its own: metrics_port, metrics_port + 1, ... in plan order.
    env = {**os.environ, **settings.to_env()}
    if not sys.stderr.isatty():
        # A log file, not a terminal: no progress bars (the packaged model's conversion, weight loading,
        # downloads), which tqdm draws as carriage returns on one endless line.
        env["TQDM_DISABLE"] = "1"
    children = [_command(spec, {**env, "DOCBATCH_METRICS_PORT": str(settings.metrics_port + i if settings.metrics_port
                                                                    else 0)})
                for i, spec in enumerate(specs)]
    for spec in specs:
        log.info("starting %s (CUDA_VISIBLE_DEVICES=%r)", spec.name, spec.cuda_visible_devices)
    return supervise(children, reap_orphans=True, killed_by_a_job=_killed_by_a_job(settings))


def _killed_by_a_job(settings: Settings) -> Callable[[Child, int], bool]:
    """Asks the store whether a dead child held a job it ran alone (its leases outlive it by most of `lease_s`)."""
    store = Store(settings.effective_database_url)

    def killed(child: Child, pid: int) -> bool:
        try:
            return store.ran_alone(Holder.owner_of(child.name, pid))
        except Exception as e:  # noqa: BLE001 - the database away: the death counts as the child's own
            log.warning("cannot tell whether a job killed %s (%s)", child.name, str(e).splitlines()[0])
            return False
    return killed
