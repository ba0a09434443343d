"""Alembic environment: the URL comes from settings, the metadata from api_client."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from api_client.database import make_engine
from api_client.schema import Base, migrated_schema_includes
from api_client.settings import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings.from_env().resolved_database_url()


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def _sqlite_batch_safety(connection: Connection) -> None:
    """Make SQLite's batch mode (copy table, drop, rename) safe for data and views.

    With foreign keys on, dropping ``jobs`` would cascade-delete every token row;
    with the modern rename, renaming the copy back to ``jobs`` fails on the views
    that name ``jobs``. Both pragmas must be set outside a transaction.
    """
    connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    connection.exec_driver_sql("PRAGMA legacy_alter_table=ON")
    connection.commit()


def run_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            _sqlite_batch_safety(connection)
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=True, compare_type=True,
                          include_object=migrated_schema_includes(connection.dialect.name))
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
