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


def test_0008_rehashes_configurations_without_reuse(database_url: str) -> None:
    """Jobs hashed before 0008 (with ``reuse`` in the configuration) get the hash the
    client computes now, so old and new runs of one probe share a report row; the
    downgrade restores the old hashes."""
    import hashlib
    import json

    from alembic import command
    from sqlalchemy import text

    from api_client.database import alembic_config, upgrade_schema
    from api_client.determinism import config_hash
    from api_client.specs import make_spec

    spec = make_spec("score", text="Finn writes code", model="gpt2", reuse=False)
    data = spec.model_dump(mode="json")
    old = hashlib.sha256(json.dumps(
        {k: v for k, v in data.items() if k not in ("seed", "device")}, sort_keys=True,
        separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
    assert old != config_hash(spec)
    command.downgrade(alembic_config(database_url), "0007")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO jobs (id, kind, backend, model, status, spec, queue, config_hash, "
                "attempts, created_at, partial) VALUES ('a' || :n, 'score', 'hf', 'gpt2', "
                "'succeeded', :spec, 'q', :hash, 1, CURRENT_TIMESTAMP, false)"),
                [{"n": "1" * 31, "spec": json.dumps(data), "hash": old}])

        def stored() -> str:
            with engine.connect() as connection:
                return connection.execute(text("SELECT config_hash FROM jobs")).scalar_one()

        upgrade_schema(database_url, "head")
        assert stored() == config_hash(spec)
        command.downgrade(alembic_config(database_url), "0007")
        assert stored() == old
    finally:
        engine.dispose()
        upgrade_schema(database_url, "head")
