"""Database connections: SQLite (WAL, busy timeout) by default, PostgreSQL by URL; schema by Alembic."""
from __future__ import annotations

import fcntl
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# SQLite allows 32,766 bound values in a statement: long lists of ids go in parts of this size.
SQL_IDS_PER_QUERY = 10_000


def chunked(items: list, size: int = SQL_IDS_PER_QUERY) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def make_engine(url: str) -> Engine:
    """An Engine for `url`. SQLite files get WAL, a busy timeout and foreign keys on every connection."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (a no-op when it is there already).

    Several processes may start at once (a worker and a submit): they take turns, through a
    PostgreSQL advisory lock or a lock file beside the SQLite database.
    """
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if database and database != ":memory:":
        with open(f"{database}.migrate-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _upgrade(engine)
    else:
        _upgrade(engine)


def _upgrade(engine: Engine) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    is_sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if is_sqlite:
            # SQLite alters a table by copying it; with foreign keys on, dropping the old copy would cascade
            # into every table that refers to it. The pragma only takes effect outside a transaction.
            _pragma(connection, "foreign_keys=OFF")
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        finally:
            if is_sqlite:
                _pragma(connection, "foreign_keys=ON")


def _pragma(connection, pragma: str) -> None:
    connection.exec_driver_sql(f"PRAGMA {pragma}")
    connection.commit()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def dialect_insert(session: Session, model: type):
    """An INSERT for `model` in the session's dialect, so that `on_conflict_do_nothing` is available."""
    return (postgresql.insert if session.bind.dialect.name == "postgresql" else sqlite.insert)(model)
