"""Shared fixtures. The parts are real: this machine's Redis and PostgreSQL, SQLite files, and the
packaged SmolLM2-135M-Instruct (converted once per test session)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from schemas.settings import Settings
from schemas.sql.store import Store
from schemas.tasks import load_task_file

REDIS_URL = os.environ.get("DOCBATCH_TEST_REDIS", "redis://127.0.0.1:6379")
POSTGRES_URL = os.environ.get("DOCBATCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
# The suite runs in pytest-xdist's processes (pyproject's addopts), a test module whole in one of them. Each
# process has a Redis database of its own for the tests that use `broker_url` (flushed before each); the modules
# that start a worker of their own use theirs (their MODULE_REDIS_DB). The databases none of those use:
XDIST_REDIS_DBS = (13, 15, 8, 5, 4, 3, 2, 1, 0)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw0", "gw1", ...; unset without xdist
TEST_REDIS_DB = XDIST_REDIS_DBS[int(XDIST_WORKER.removeprefix("gw"))]
if "PYTEST_XDIST_WORKER" in os.environ:
    # One thread each for torch (in these processes and the workers they start): two processes of two busy-waiting
    # OpenMP threads each on two cores took a model's test 5 times as long (see worker/engine/cpu_threads.py).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# A custom task of short answers (see the file), for the pipeline tests about what happens around the model
PARTIES_TASK_FILE = Path(__file__).parent / "tasks" / "parties.toml"
PARTIES_TASK = load_task_file(PARTIES_TASK_FILE, Settings())
BRIEF_TASK = load_task_file(Path(__file__).parent / "tasks" / "brief.toml", Settings())


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def small_model_dir(model_cache: Path) -> Path:
    """The packaged GGUF converted by the product's own code path (slow once, about 15 s)."""
    from worker.models.source import packaged_model_dir

    return packaged_model_dir(model_cache)


@pytest.fixture(scope="session")
def vl_model_dir(small_model_dir: Path, tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint laid out as on the hub: config, weights, tokenizer, processor."""
    from tiny_models import write_tiny_qwen25_vl

    return write_tiny_qwen25_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), small_model_dir)


@pytest.fixture(scope="session")
def small_model(small_model_dir: Path):
    """In float32: the reference the engines' answers are compared with token for token (a worker on a CPU with
    bfloat16 instructions computes in bfloat16, where two implementations round differently)."""
    return _load_small_model(small_model_dir, "float32")


@pytest.fixture(scope="session")
def small_model_as_worker(small_model_dir: Path):
    """As the hf engine of a worker on this machine runs it (`dtype=auto`): for tests of what the model answers."""
    loaded = _load_small_model(small_model_dir, "auto")
    loaded.hf_engine_model()
    return loaded


def _load_small_model(small_model_dir: Path, dtype: str):
    from worker.models.loading import load_model

    return load_model(Settings(model=str(small_model_dir), device="cpu", home=small_model_dir.parent, dtype=dtype))


@pytest.fixture
def broker_url() -> str:
    url = f"{REDIS_URL}/{TEST_REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


@contextlib.contextmanager
def postgres_database():
    """The SQLAlchemy URL of a fresh, empty PostgreSQL database, dropped afterwards."""
    name = f"docbatch_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:
    """Each test using this runs twice: on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'docbatch.sqlite3'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture
def store(database_url: str) -> Store:
    store = Store(database_url)
    store.migrate()
    yield store
    store.close()


# Room for the small model's whole answers (the longest summaries and extractions here take 400 to 500 tokens): an
# answer cut short would be asked again, alone, at twice the room, the first tokens computed twice.
PIPELINE = {"device": "cpu", "max_new_tokens": 640, "max_batch_size": 16, "max_wait_ms": 300, "prepare_concurrency": 2}


@pytest.fixture
def settings(tmp_path: Path, broker_url: str, small_model_dir: Path) -> Settings:
    """Settings for a local pipeline: SQLite under tmp_path, test Redis DB, the small model on CPU."""
    return Settings(home=tmp_path / "home", broker_url=broker_url, model=str(small_model_dir), **PIPELINE)


def shared_worker_settings(folder: Path, model_dir: Path, redis_db: int, **overrides) -> Settings:
    """Settings for a worker that a whole module's tests share: SQLite under `folder` (unless `overrides` name
    another database), the Redis database `redis_db` of its own (flushed now), the small model on CPU."""
    broker_url = f"{REDIS_URL}/{redis_db}"
    redis.Redis.from_url(broker_url).flushdb()
    return Settings(**{"home": folder / "home", "broker_url": broker_url, "model": str(model_dir),
                       "database_url": f"sqlite:///{folder / 'docbatch.sqlite3'}", **PIPELINE, **overrides})


@pytest.fixture(scope="module")
def module_worker(module_settings: Settings, tmp_path_factory):
    """One worker for a whole module, on the module's own `module_settings` (see shared_worker_settings)."""
    with worker_process(module_settings, tmp_path_factory.mktemp("logs") / "worker.log") as process:
        yield process


@pytest.fixture
def worker_settings(settings: Settings, database_url: str) -> Settings:
    return settings.model_copy(update={"database_url": database_url})


@contextlib.contextmanager
def worker_process(settings: Settings, log_path: Path):
    """`docbatch worker --gpus cpu` as its own process tree, stopped (warm shutdown) afterwards."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "producer.cli", "worker", "--gpus", "cpu"],
                                   env={**os.environ, **settings.to_env()}, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            process.terminate()
            process.wait(60)
