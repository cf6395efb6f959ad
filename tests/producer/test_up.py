"""`docbatch up`: Redis started here (none answers at the configured URL), a worker, beat, the HTTP API and
Flower as local processes, all stopped by one Ctrl-C. The worker runs with `--gpus none` (the prepare worker
alone): which inference workers `--gpus` plans is `test_launcher.py`'s business, and loading the model
here would only cost time."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from producer.service.embedded import free_port, is_reachable
from schemas.inboxes import InboxConfig
from schemas.settings import Settings
from services import HOST, api_status, flower_get, wait_for

pytestmark = pytest.mark.slow


def test_up_starts_the_whole_topology_and_one_ctrl_c_stops_all_of_it(tmp_path, small_model_dir):
    # Given settings naming a Redis nobody runs, an inbox and Flower credentials
    (tmp_path / "inbox").mkdir()
    settings = Settings(home=tmp_path / "home", broker_url=f"redis://127.0.0.1:{free_port()}/0",
                        model=str(small_model_dir), metrics_port=free_port(), flower_port=free_port(),
                        flower_user="ops", flower_password="s3cret-flower", api_port=free_port(),
                        inbox=(InboxConfig(name="docs", folder=tmp_path / "inbox", task="summarize", every_s=1),))
    with open(tmp_path / "up.log", "w") as log:
        up = subprocess.Popen([sys.executable, "-m", "producer.cli", "up", "--gpus", "none"],
                              env={**os.environ, **settings.to_env()}, cwd=tmp_path, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # When it is up: Flower answers, with the worker that the started Redis connects it to
        wait_for(lambda: up.poll() is None and f"prepare@{HOST}" in (flower_get(settings, "/api/workers?refresh=1")[1]
                                                                      or {}),
                 "Flower to list the worker", timeout_s=180)
        # ... and the API answers (a request without a key is refused in OpenAI's shape)
        wait_for(lambda: api_status(settings) == 401, "the API to answer", timeout_s=60)
        # ... and Ctrl-C reaches its process group, as a terminal sends it
        os.killpg(up.pid, signal.SIGINT)
        code = up.wait(120)
    finally:
        if up.poll() is None:  # the test failed early: up still stops what it started
            up.terminate()
            up.wait(180)
    output = (tmp_path / "up.log").read_text()

    # Then it said what it started, stopped everything cleanly, and left no process behind
    assert code == 0, output[-3000:]
    redis_url = re.search(r"started an embedded one at (redis://127\.0\.0\.1:\d+/0)", output).group(1)
    assert "stopped worker, beat, api, flower" in output
    assert (tmp_path / "home" / "logs" / "beat.log").exists()
    started = {name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", output)}
    assert set(started) == {"worker", "beat", "api", "flower"}
    for group in [up.pid, *started.values()]:  # each child ran in a process group of its own, with its children
        wait_for(lambda: not group_alive(group), f"process group {group} to be gone", timeout_s=30)
    assert not is_reachable(redis_url)  # the Redis it started (in a session of its own) is stopped too


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
