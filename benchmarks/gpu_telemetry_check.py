"""Check the GPU telemetry on a GPU box: start a worker's metrics exporter (the same `start_telemetry` a GPU
worker runs), keep the GPU busy with matrix products, scrape the endpoint and print the GPU series beside
what nvidia-smi says at the same moment.

    python benchmarks/gpu_telemetry_check.py                 # GPU 0 (or CUDA_VISIBLE_DEVICES), 3 scrapes
    python benchmarks/gpu_telemetry_check.py --url http://host:9400/metrics   # a running worker instead

Without a GPU or driver it says so and prints no GPU series: they are absent, never faked.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producer.service.embedded import free_port  # noqa: E402 - after the path set-up above
from producer.service.top_data import parse_metrics  # noqa: E402

NVIDIA_SMI_QUERY = "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"


def busy_gpu(stop: threading.Event, size: int) -> None:
    """Matrix products on the first visible GPU until `stop`, so that utilisation and power move."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(50):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def start_exporter() -> tuple[str, bool]:
    """The endpoint of an exporter started here, and whether it reads a GPU."""
    from schemas.settings import Settings
    from worker.telemetry.exporter import start_telemetry

    home = Path(tempfile.mkdtemp(prefix="docbatch-telemetry-"))
    settings = Settings(home=home, metrics_port=free_port(), alert_interval_s=1)
    telemetry = start_telemetry(settings, "infer", "gpucheck@local")
    if telemetry.monitor is None:
        print("no GPU telemetry here (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides every GPU)")
    return telemetry.url, telemetry.monitor is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="scrape this running worker's endpoint instead of starting one")
    parser.add_argument("--scrapes", type=int, default=3)
    parser.add_argument("--every-s", type=float, default=2.0)
    parser.add_argument("--matmul-size", type=int, default=8192, help="0: leave the GPU idle")
    args = parser.parse_args()
    url, has_gpu = (args.url, True) if args.url else start_exporter()
    stop = threading.Event()
    load = threading.Thread(target=busy_gpu, args=(stop, args.matmul_size), daemon=True)
    if not args.url and has_gpu and args.matmul_size:
        load.start()
    try:
        for i in range(args.scrapes):
            time.sleep(args.every_s)
            with urllib.request.urlopen(url, timeout=10) as response:
                samples = parse_metrics(response.read().decode())
            print(f"--- scrape {i + 1} of {url}")
            for s in samples:
                if s.name.startswith(("docbatch_gpu_", "docbatch_alert")) and (s.value or s.name != "docbatch_alert"):
                    print(f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}} {s.value:g}")
            if shutil.which("nvidia-smi"):
                smi = subprocess.run(["nvidia-smi", f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv"],
                                     capture_output=True, text=True, check=False)
                print("nvidia-smi:", smi.stdout.strip().replace("\n", "\n            "))
    finally:
        stop.set()
        if load.is_alive():  # a thread still in CUDA when the interpreter exits aborts the process
            load.join()
    print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}")


if __name__ == "__main__":
    main()
