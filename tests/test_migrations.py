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


def test_0008_rehashes_jobs_as_the_client_hashes_them(database_url: str) -> None:
    """A job stored before 0008 (``reuse`` in its configuration, ``dtype`` left null)
    gets the hashes the client computes now for the same probe, so old and new runs
    share a report row and old results are reused; the downgrade restores the old."""
    import hashlib
    import json

    from alembic import command
    from sqlalchemy import text

    from api_client.database import alembic_config, upgrade_schema
    from api_client.determinism import config_hash
    from api_client.reuse import spec_hash
    from api_client.specs import make_spec

    spec = make_spec("score", text="Finn writes code", model="gpt2", reuse=False)
    stored = {**spec.model_dump(mode="json"), "dtype": None}  # as the old client wrote it

    def digest(leave_out: tuple[str, ...]) -> str:
        data = {k: v for k, v in stored.items() if k not in leave_out}
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False).encode()).hexdigest()

    old = (digest(("seed", "device")), digest(("reuse",)))
    assert old[0] != config_hash(spec) and old[1] != spec_hash(spec)
    command.downgrade(alembic_config(database_url), "0007")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO jobs (id, kind, backend, model, status, spec, queue, config_hash, "
                "spec_hash, attempts, created_at, partial) VALUES (:id, 'score', 'hf', 'gpt2', "
                "'succeeded', :spec, 'q', :config, :spec_hash, 1, CURRENT_TIMESTAMP, false)"),
                [{"id": "a" * 32, "spec": json.dumps(stored), "config": old[0],
                  "spec_hash": old[1]}])

        def hashes() -> tuple[str, str]:
            with engine.connect() as connection:
                row = connection.execute(text("SELECT config_hash, spec_hash FROM jobs")).one()
            return row[0], row[1]

        upgrade_schema(database_url, "head")
        assert hashes() == (config_hash(spec), spec_hash(spec))
        command.downgrade(alembic_config(database_url), "0007")
        assert hashes() == old
    finally:
        engine.dispose()
        upgrade_schema(database_url, "head")


def test_0009_hashes_outputs_without_ids_by_their_text(database_url: str) -> None:
    """OpenAI tokens have no id unless the worker has the model's tiktoken encoding:
    before 0009 two continuations of the same length had one output hash whatever
    their texts (the determinism report saw one output). After it, a token without an
    id is hashed by its text, and the hash is what the worker computes now; a job whose
    tokens have ids keeps its hash; the downgrade restores the old hashes."""
    import hashlib
    import json

    from alembic import command
    from sqlalchemy import text

    from api_client.database import alembic_config, upgrade_schema
    from api_client.determinism import canonical_json, output_hash
    from api_client.results import SequenceResult, TokenLogprob

    def sequence(words: list[str], ids: list[int | None]) -> SequenceResult:
        pairs = enumerate(zip(words, ids, strict=True))
        return SequenceResult(index=0, text="".join(words), finish_reason="length",
                              tokens=tuple(TokenLogprob(position=i + 1, token_id=t, token=w,
                                                        logprob=-1.0, generated=True)
                                           for i, (w, t) in pairs),
                              prompt_tokens=(TokenLogprob(position=0, token_id=None,
                                                          token="Hi", logprob=None,
                                                          generated=False),))

    runs = {"a" * 32: sequence([" w1", " w2"], [None, None]),
            "b" * 32: sequence([" w3", " w4"], [None, None]),
            "c" * 32: sequence([" w1", " w2"], [7, 8])}
    old = {job_id: hashlib.sha256(canonical_json([s.token_ids]).encode()).hexdigest()
           for job_id, s in runs.items()}  # the ids alone, as before 0009
    assert old["a" * 32] == old["b" * 32]
    new = {job_id: output_hash([s]) for job_id, s in runs.items()}
    assert len(set(new.values())) == 3 and new["c" * 32] == old["c" * 32]

    command.downgrade(alembic_config(database_url), "0008")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            for job_id, seq in runs.items():
                connection.execute(text(
                    "INSERT INTO jobs (id, kind, backend, model, status, spec, queue, "
                    "output_hash, attempts, created_at, partial) VALUES (:id, 'generate', "
                    "'openai', 'davinci-002', 'succeeded', :spec, 'q', :hash, 1, "
                    "CURRENT_TIMESTAMP, false)"),
                    [{"id": job_id, "spec": json.dumps({}), "hash": old[job_id]}])
                connection.execute(text(
                    "INSERT INTO sequences (job_id, sequence_index, text, num_tokens, "
                    "num_generated) VALUES (:id, 0, :text, 3, 2)"),
                    [{"id": job_id, "text": seq.text}])
                connection.execute(text(
                    "INSERT INTO tokens (job_id, sequence_index, position, token_id, token, "
                    "logprob, generated) VALUES (:id, 0, :position, :token_id, :token, "
                    ":logprob, :generated)"),
                    [{"id": job_id, "position": t.position, "token_id": t.token_id,
                      "token": t.token, "logprob": t.logprob, "generated": t.generated}
                     for t in (*seq.prompt_tokens, *seq.tokens)])

        def hashes() -> dict[str, str]:
            with engine.connect() as connection:
                return dict(connection.execute(text("SELECT id, output_hash FROM jobs")).all())

        upgrade_schema(database_url, "head")
        assert hashes() == new
        command.downgrade(alembic_config(database_url), "0008")
        assert hashes() == old
    finally:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM jobs"))
        engine.dispose()
        upgrade_schema(database_url, "head")


def test_0010_makes_json_null_request_params_sql_null(database_url: str) -> None:
    """Result reuse copied an hf job's absent request parameters as a JSON ``null``;
    0010 makes them SQL NULL (``request_params IS NULL``), real parameters untouched."""
    import json

    from alembic import command
    from sqlalchemy import text

    from api_client.database import alembic_config, upgrade_schema

    command.downgrade(alembic_config(database_url), "0009")
    engine = make_engine(database_url)
    params = {"model": "davinci-002", "logprobs": 5}
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO jobs (id, kind, backend, model, status, spec, queue, "
                "request_params, attempts, created_at, partial) VALUES (:id, 'score', "
                ":backend, 'm', 'succeeded', :spec, 'q', :params, 1, CURRENT_TIMESTAMP, false)"),
                [{"id": "a" * 32, "backend": "hf", "spec": "{}", "params": "null"},
                 {"id": "b" * 32, "backend": "openai", "spec": "{}",
                  "params": json.dumps(params)},
                 {"id": "c" * 32, "backend": "hf", "spec": "{}", "params": None}])
        upgrade_schema(database_url, "head")
        with engine.connect() as connection:
            rows = dict(connection.execute(text(
                "SELECT id, request_params FROM jobs WHERE request_params IS NOT NULL")).all())
        assert list(rows) == ["b" * 32]
        stored = rows["b" * 32]
        assert (json.loads(stored) if isinstance(stored, str) else stored) == params
    finally:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM jobs"))
        engine.dispose()
        upgrade_schema(database_url, "head")
