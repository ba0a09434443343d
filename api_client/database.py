"""Engines, sessions and schema upgrades. Nothing here runs at import time."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import sessionmaker

from .errors import ConfigError
from .settings import mask_url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the worker's writes
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _postgres_settings(dbapi_connection: Any, _record: Any) -> None:
    """Plan every execution of a prepared statement for its parameters and the tables
    as they are now. psycopg prepares a statement run 5 times on a connection, and
    PostgreSQL may then keep one generic plan until the table is analyzed: a plan
    made while ``jobs`` held a few rows (a scan of the table) stayed for a worker's
    claims as a sweep grew it to thousands (with autovacuum off or behind), and each
    claim read every job row. Planning these statements takes well under a
    millisecond."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET plan_cache_mode = force_custom_plan")
    dbapi_connection.commit()


def check_database_url(url: str) -> None:
    """Refuse a database URL whose password holds an unencoded ``@``.

    SQLAlchemy ends the password at the URL's *first* ``@`` and reads the rest of it
    as the host, port or database name: psycopg's "failed to resolve host
    'rest@db.example.org'", the port's "invalid literal for int()", a masked URL and
    every log line would show it. :func:`make_engine` and the worker's start call this.
    """
    _scheme, sep, rest = url.partition("://")
    if sep and not rest.startswith("/") and rest.count("@") > 1:  # sqlite:///a@b: no host
        raise ConfigError(
            f"the database URL {mask_url(url)} has more than one '@', so its password "
            "cannot be read: percent-encode '@' in the password (and in a query value) "
            "as %40")


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the settings logprobe relies on."""
    check_database_url(url)
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        kwargs.setdefault("connect_args", {"timeout": 30})
    else:
        kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    elif engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _postgres_settings)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """Where the Alembic environment lives (the top-level ``migrations`` package)."""
    spec = importlib.util.find_spec("migrations")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the 'migrations' package is not installed with logprobe")
    return Path(next(iter(spec.submodule_search_locations)))


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_schema(url: str, revision: str = "head") -> None:
    """Run ``alembic upgrade`` on the database at ``url``."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def ensure_schema(engine: Engine) -> None:
    """Create the schema on an empty database (the embedded default's first use)."""
    if not inspect(engine).has_table("alembic_version"):
        upgrade_schema(engine.url.render_as_string(hide_password=False))
