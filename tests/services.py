"""Helpers for the tests that drive docbatch's service processes (worker, beat, Flower, `up`, the API) over the
network."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from schemas.settings import Settings

FLOWER_USER, FLOWER_PASSWORD = "ops", "s3cret-flower"
HOST = socket.gethostname()


def wait_for(condition, what: str, timeout_s: float = 300, every_s: float = 0.5):
    """Poll `condition` until it returns something true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(every_s)
    pytest.fail(f"timed out waiting for {what}")


def flower_get(settings: Settings, path: str, auth: bool = True, method: str = "GET") -> tuple[int, object]:
    request = urllib.request.Request(f"http://127.0.0.1:{settings.flower_port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
    if auth:
        token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def api_status(settings: Settings) -> int:
    """The status `docbatch api` answers a request without a key with (401 once it is up), 0 if it does not."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{settings.api_port}/v1/batches", timeout=5)
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):
        return 0
    return 200


@contextlib.contextmanager
def api_process(settings: Settings, log_path):
    """`docbatch api` as its own process on `settings.api_port`, handed over once it answers, stopped afterwards."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "producer.cli", "api"], env={**os.environ, **settings.to_env()},
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: process.poll() is not None or api_status(settings) == 401, "the API to answer", timeout_s=60,
                 every_s=0.2)
        if process.poll() is not None:
            pytest.fail(f"docbatch api exited: {open(log_path).read()[-3000:]}")
        yield process
    finally:
        process.terminate()
        process.wait(60)
