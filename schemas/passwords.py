"""No placeholder passwords: every docbatch process checks the passwords its settings hold before it starts.

`deploy/example.env` ships `change-me-...` placeholders for compose's Redis, PostgreSQL and Flower. A process
whose broker URL, database URL or Flower password still holds one, or any password under
`MIN_PASSWORD_CHARS` characters, refuses to start, with one line per setting naming it and saying how to make
a good one. A URL without a password (the default `redis://localhost:6379/0`, a SQLite file, a local
PostgreSQL with trust or peer authentication) is left alone: there is nothing to guess.
"""
from __future__ import annotations

from urllib.parse import unquote, urlsplit

from schemas.settings import Settings

MIN_PASSWORD_CHARS = 12
PLACEHOLDER_PREFIX = "change-me"  # deploy/example.env's change-me-redis, change-me-postgres, change-me-flower
GENERATE = "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"  # letters, digits, '-' and '_': URL-safe


class WeakPassword(ValueError):
    """A password in the settings is a placeholder or too short; the message has a line for each."""


def password_problems(settings: Settings) -> list[str]:
    """One line per password setting that is a placeholder or too short (none: all is well)."""
    found = [("DOCBATCH_BROKER_URL", "REDIS_PASSWORD", _url_password(settings.broker_url)),
             ("DOCBATCH_DATABASE_URL", "POSTGRES_PASSWORD", _url_password(settings.database_url)),
             ("DOCBATCH_FLOWER_PASSWORD", "FLOWER_PASSWORD", settings.flower_password.get_secret_value() or None)]
    return [f"{name}: {problem}; set a generated one (with compose: {compose_name} in .env): {GENERATE}"
            for name, compose_name, password in found if password is not None and (problem := _weakness(password))]


def check_passwords(settings: Settings) -> None:
    """Raise `WeakPassword` when `password_problems` finds any: what every docbatch process calls at start."""
    problems = password_problems(settings)
    if problems:
        raise WeakPassword("refusing to start with a weak password:\n  " + "\n  ".join(problems))


def _url_password(url: str) -> str | None:
    """The password a URL carries (`scheme://user:password@host/...`), None when it carries none."""
    if not url or "://" not in url:
        return None
    password = urlsplit(url).password
    return unquote(password) if password is not None else None


def _weakness(password: str) -> str | None:
    if password.lower().startswith(PLACEHOLDER_PREFIX):
        return f"the password is deploy/example.env's placeholder ({password!r})"
    if len(password) < MIN_PASSWORD_CHARS:
        return f"the password has {len(password)} characters, fewer than {MIN_PASSWORD_CHARS}"
    return None
