"""compose.yaml, as `docker-compose config` resolves it with the example .env (no Docker engine needed; the
Makefile installs Debian's docker-compose). The resolved file is checked for what the deployment promises."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCBATCH_SERVICES = {"migrate", "prepare", "gpu0", "gpu1", "beat", "api", "flower"}

pytestmark = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                reason="docker-compose is not installed (`make system-deps` installs it with apt-get)")


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["docker-compose", "--env-file", str(env_file), "-f", str(ROOT / "compose.yaml"), "config"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def services() -> dict:
    done = compose_config(ROOT / "deploy" / "example.env")
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


def test_every_service_restarts_and_the_long_running_ones_have_healthchecks(services):
    assert set(services) == DOCBATCH_SERVICES | {"redis", "postgres"}
    assert services["migrate"]["restart"] == "no"
    assert all(s["restart"] == "unless-stopped" for name, s in services.items() if name != "migrate")
    assert {name for name, s in services.items() if "healthcheck" in s} == {"redis", "postgres", "prepare", "gpu0",
                                                                             "gpu1", "api", "flower"}


def test_the_docbatch_services_wait_for_the_migration_and_it_for_the_databases(services):
    for name in DOCBATCH_SERVICES - {"migrate"}:
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["depends_on"] == {"redis": {"condition": "service_healthy"},
                                                 "postgres": {"condition": "service_healthy"}}


def test_redis_keeps_messages_and_asks_for_a_password_and_postgres_keeps_its_data(services):
    redis_command = " ".join(services["redis"]["command"])
    assert all(flag in redis_command for flag in ("--appendonly yes", "--maxmemory-policy noeviction",
                                                  "--requirepass"))
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == "change-me-redis"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "change-me-postgres"
    assert any(v.endswith(":/var/lib/postgresql/data:rw") for v in services["postgres"]["volumes"])
    assert services["gpu0"]["environment"]["DOCBATCH_BROKER_URL"] == "redis://:change-me-redis@redis:6379/0"


def test_one_gpu_worker_per_gpu_each_with_its_device_reserved(services):
    for index in (0, 1):
        worker = services[f"gpu{index}"]
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [str(index)] and device["capabilities"] == ["gpu"]
        assert worker["command"] == ["worker", "--gpus", "0", "--no-prepare"]
    assert services["prepare"]["command"] == ["worker", "--gpus", "none"]


def test_ports_bind_to_loopback_by_default_and_flower_has_credentials(services):
    published = [port for s in services.values() for port in s.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for port in published)
    flower = services["flower"]["environment"]
    assert (flower["DOCBATCH_FLOWER_USER"], flower["DOCBATCH_FLOWER_PASSWORD"]) == ("admin", "change-me-flower")


def test_the_api_listens_in_its_container_and_is_published_on_loopback(services):
    api = services["api"]
    assert api["command"] == ["api", "--address", "0.0.0.0"]
    assert api["ports"] == ["127.0.0.1:8000:8000/tcp"]
    assert "urllib.request.urlopen('http://127.0.0.1:8000/v1/batches'" in " ".join(api["healthcheck"]["test"])


def test_a_missing_password_stops_compose_with_a_message(tmp_path):
    env = tmp_path / "no-passwords.env"
    env.write_text("FLOWER_USER=admin\n")
    done = compose_config(env)
    assert done.returncode != 0 and "set REDIS_PASSWORD in .env" in done.stderr


def test_the_migrate_step_refuses_the_example_passwords_so_compose_up_stops_early(services, tmp_path):
    # Given the migrate service as compose resolves it with the example .env (its change-me-... passwords)
    migrate = services["migrate"]
    assert migrate["environment"]["DOCBATCH_FLOWER_PASSWORD"] == "change-me-flower"
    env = {**os.environ, **migrate["environment"], "DOCBATCH_HOME": str(tmp_path), "DOCBATCH_CONFIG": "/nonexistent"}
    # When its command runs (here, outside a container: its database host does not even resolve)
    done = subprocess.run([sys.executable, "-m", "producer.cli", *migrate["command"]], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    # Then it fails at once, before it reaches any database, naming each placeholder; the services that wait for
    # it never start
    assert done.returncode == 1, done.stderr
    for setting in ("DOCBATCH_BROKER_URL", "DOCBATCH_DATABASE_URL", "DOCBATCH_FLOWER_PASSWORD"):
        assert f"{setting}: the password is deploy/example.env's placeholder" in done.stderr
