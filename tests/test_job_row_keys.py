"""Token and top-k rows belong to a job, on both databases: rows naming no job are
refused, and a job's rows go with it. On PostgreSQL statement-level triggers enforce
this (migration 0007) in place of per-row foreign-key checks; these tests hold them to
the constraint's behaviour, through the worker's bulk path (``COPY``) and plain SQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, func, insert, inspect, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api_client.bulk_insert import insert_rows
from api_client.database import alembic_config, make_engine, make_sessionmaker
from api_client.schema import STATEMENT_CHECKED_TABLES, Job, JobStatus, Token, TopLogprob
from tests import helpers
from tests.conftest import make_database
from worker.output_rows import TOKEN_COLUMNS, TOP_COLUMNS

# The bulk path writes through the driver (psycopg's COPY), whose errors SQLAlchemy
# does not wrap.
INTEGRITY_ERRORS = (IntegrityError, psycopg.IntegrityError)


def add_jobs(sessions: sessionmaker[Session], n: int) -> list[str]:
    return helpers.add_jobs(sessions, n, JobStatus.RUNNING)


def token_rows(job_id: str, n: int = 5) -> list[tuple[object, ...]]:
    return [(job_id, 0, p, 100 + p, f" t{p}", -1.0 - p, False) for p in range(n)]


def top_rows(job_id: str, n: int = 5) -> list[tuple[object, ...]]:
    return [(job_id, 0, p, r, 200 + r, f" a{r}", -0.5 - r) for p in range(n) for r in range(2)]


def store(sessions: sessionmaker[Session], job_ids: list[str]) -> None:
    with sessions() as session, session.begin():
        insert_rows(session, Token, TOKEN_COLUMNS, [r for j in job_ids for r in token_rows(j)])
        insert_rows(session, TopLogprob, TOP_COLUMNS, [r for j in job_ids for r in top_rows(j)])


def count(sessions: sessionmaker[Session], model: type, job_id: str) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).select_from(model)
                              .where(model.job_id == job_id))  # type: ignore[attr-defined]


@pytest.mark.parametrize("model,columns,rows", [(Token, TOKEN_COLUMNS, token_rows),
                                                (TopLogprob, TOP_COLUMNS, top_rows)])
def test_rows_of_no_job_are_refused_and_nothing_is_stored(
        sessions: sessionmaker[Session], model: type, columns: tuple[str, ...], rows) -> None:
    [job] = add_jobs(sessions, 1)
    ghost = uuid.uuid4().hex
    # One bad row among good ones fails the whole statement, bulk path and plain insert.
    with pytest.raises(INTEGRITY_ERRORS), sessions() as session, session.begin():
        insert_rows(session, model, columns, [*rows(job), *rows(ghost)[:1]])
    with pytest.raises(INTEGRITY_ERRORS), sessions() as session, session.begin():
        session.execute(insert(model), [dict(zip(columns, r, strict=True)) for r in rows(ghost)])
    assert count(sessions, model, job) == 0
    assert count(sessions, model, ghost) == 0
    # Moving stored rows to no job is refused too.
    store(sessions, [job])
    with pytest.raises(INTEGRITY_ERRORS), sessions() as session, session.begin():
        session.execute(update(model).where(model.job_id == job)  # type: ignore[attr-defined]
                        .values(job_id=ghost))
    assert count(sessions, model, job) == len(rows(job))


def test_deleting_jobs_deletes_their_rows_only(sessions: sessionmaker[Session]) -> None:
    gone, kept_a, kept_b = add_jobs(sessions, 3)
    store(sessions, [gone, kept_a, kept_b])
    with sessions() as session, session.begin():
        session.execute(Job.__table__.delete().where(Job.id.in_([gone])))
    for model in (Token, TopLogprob):
        assert count(sessions, model, gone) == 0
        assert count(sessions, model, kept_a) == count(sessions, model, kept_b) > 0


@pytest.fixture
def postgres_url(tmp_path: Path) -> Iterator[str]:
    yield from make_database("postgres", tmp_path)


@pytest.mark.postgres
def test_postgres_triggers_hold_what_the_constraint_held(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    try:
        _check_postgres_triggers(postgres_url, engine, make_sessionmaker(engine))
    finally:
        engine.dispose()


def _check_postgres_triggers(database_url: str, engine: Engine,
                             sessions: sessionmaker[Session]) -> None:
    # Storing rows locks their job until commit: a concurrent delete waits, then
    # deletes them with the job (it cannot leave orphans behind).
    [job] = add_jobs(sessions, 1)
    storing = sessions()
    storing.begin()
    insert_rows(storing, Token, TOKEN_COLUMNS, token_rows(job))
    with sessions() as session, session.begin():
        session.execute(text("SET LOCAL lock_timeout = '200ms'"))
        with pytest.raises(DBAPIError, match="lock timeout"):
            session.execute(Job.__table__.delete().where(Job.id == job))
    deleted = threading.Event()

    def delete_job() -> None:
        with sessions() as session, session.begin():
            session.execute(Job.__table__.delete().where(Job.id == job))
        deleted.set()

    deleter = threading.Thread(target=delete_job)
    deleter.start()
    assert not deleted.wait(0.5), "the delete did not wait for the rows' transaction"
    storing.commit()
    storing.close()
    deleter.join(10)
    assert deleted.is_set() and count(sessions, Token, job) == 0

    # A job's id cannot change under its rows.
    [job] = add_jobs(sessions, 1)
    store(sessions, [job])
    with pytest.raises(IntegrityError, match="cannot change"), sessions() as session, \
            session.begin():
        session.execute(update(Job).where(Job.id == job).values(id=uuid.uuid4().hex))
    # Truncating jobs truncates their rows.
    with sessions() as session, session.begin():
        session.execute(text("TRUNCATE jobs CASCADE"))
    for model in (Token, TopLogprob):
        assert count(sessions, model, job) == 0

    # Down to 0005 the constraints come back; up again they are triggers.
    from alembic import command

    def job_keys() -> set[str]:
        with engine.connect() as connection:
            return {table for table in STATEMENT_CHECKED_TABLES
                    if inspect(connection).get_foreign_keys(table)}

    assert job_keys() == set()
    command.downgrade(alembic_config(database_url), "0005")
    assert job_keys() == set(STATEMENT_CHECKED_TABLES)
    command.upgrade(alembic_config(database_url), "head")
    assert job_keys() == set()
    with pytest.raises(INTEGRITY_ERRORS), sessions() as session, session.begin():
        insert_rows(session, Token, TOKEN_COLUMNS, token_rows(uuid.uuid4().hex))
