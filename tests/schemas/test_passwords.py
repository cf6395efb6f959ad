"""No placeholder passwords: the check every docbatch process makes at start, against deploy/example.env's own
placeholders."""
from __future__ import annotations

from pathlib import Path

import pytest

from schemas.passwords import WeakPassword, check_passwords, password_problems
from schemas.settings import Settings

EXAMPLE_ENV = Path(__file__).resolve().parents[2] / "deploy" / "example.env"


def _example_passwords() -> dict[str, str]:
    lines = [line.split("=", 1) for line in EXAMPLE_ENV.read_text().splitlines() if "=" in line and line[0] != "#"]
    return {name: value for name, value in lines if name.endswith("_PASSWORD")}


def test_every_placeholder_the_example_env_ships_is_refused_where_compose_puts_it():
    # Given the settings compose builds from deploy/example.env as it ships
    shipped = _example_passwords()
    assert set(shipped) == {"REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_PASSWORD"}
    settings = Settings(broker_url=f"redis://:{shipped['REDIS_PASSWORD']}@redis:6379/0",
                        database_url=f"postgresql+psycopg://docbatch:{shipped['POSTGRES_PASSWORD']}@postgres/docbatch",
                        flower_user="admin", flower_password=shipped["FLOWER_PASSWORD"])
    # When it is checked, then each of the three is named, with its compose variable and how to make one
    with pytest.raises(WeakPassword) as refused:
        check_passwords(settings)
    lines = str(refused.value).splitlines()
    assert lines[0] == "refusing to start with a weak password:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["DOCBATCH_BROKER_URL", "DOCBATCH_DATABASE_URL",
                                                                   "DOCBATCH_FLOWER_PASSWORD"]
    assert all("placeholder" in line and "secrets.token_urlsafe(24)" in line for line in lines[1:])
    assert "with compose: POSTGRES_PASSWORD in .env" in lines[2]


@pytest.mark.parametrize("password, refused", [
    ("change-me-please-ok-long", True),  # any change-me-..., however long
    ("hunter2", True), ("elevenchars", True),  # under 12 characters
    ("twelve-chars", False), ("Zq8_vN3-pL0xWc7rT2yH5kJd", False),
    ("p%40ss%2Fw0rd-long", False),  # percent-encoded in the URL: 14 characters once decoded
])
def test_a_short_password_is_refused_in_a_url_or_a_setting(password, refused):
    for settings in (Settings(broker_url=f"redis://:{password}@queue-host:6379/0"),
                     Settings(database_url=f"postgresql+psycopg://docbatch:{password}@db-host/docbatch"),
                     Settings(flower_password=password)):
        assert bool(password_problems(settings)) == refused


def test_urls_without_a_password_are_fine():
    for settings in (Settings(), Settings(database_url="sqlite:////tmp/docbatch.sqlite3"),
                     Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:5432/docbatch"),
                     Settings(broker_url="redis://queue-host:6379/0", flower_password="")):
        check_passwords(settings)
    assert password_problems(Settings(broker_url="redis://:@queue-host:6379/0")) == [
        "DOCBATCH_BROKER_URL: the password has 0 characters, fewer than 12; set a generated one (with compose: "
        "REDIS_PASSWORD in .env): python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"]
