"""`alembic upgrade head` builds exactly the schema the models declare, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from api_client.database import make_engine
from api_client.schema import Base, migrated_schema_includes


def test_upgrade_head_matches_models(database_url: str) -> None:
    # database_url is an empty database migrated with upgrade_schema(url) ("head").
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={
                "compare_type": True,
                "include_object": migrated_schema_includes(connection.dialect.name)})
            diff = compare_metadata(context, Base.metadata)
            tables = set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    assert diff == [], f"the migrations differ from api_client.schema: {diff}"
    assert {"jobs", "sequences", "tokens", "top_logprobs", "alembic_version"} <= tables
