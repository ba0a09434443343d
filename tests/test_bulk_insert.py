"""The bulk path (PostgreSQL ``COPY``, SQLite INSERTs of many rows) stores rows exactly as
SQLAlchemy's insert does: the same values read back, defaults and NULLs included."""

from __future__ import annotations

import math
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api_client.bulk_insert import insert_rows
from api_client.schema import Job, JobStatus, Token
from worker.output_rows import TOKEN_COLUMNS

JOB_COLUMNS = ("id", "kind", "backend", "model", "status", "spec", "queue", "seed",
               "config_hash", "partial", "time_limit", "sweep_id", "spec_hash", "attempts",
               "created_at")


def job_row(n: int) -> tuple[object, ...]:
    created = datetime(2026, 11, 27, 5, 0, n, 123456, tzinfo=timezone.utc)
    return (uuid.uuid4().hex, "score", "hf", f"model-{n}", JobStatus.QUEUED,
            {"text": f"héllo {n}", "top_logprobs": n, "nested": [1.5, None, True]},
            "logprobe.hf", n if n % 2 else None, f"config-{n}", bool(n % 2),
            60 * n if n else None, None if n % 3 else "sweep", f"spec-{n}", n, created)


def read_job(session: Session, job_id: str) -> tuple[object, ...]:
    job = session.get(Job, job_id)
    assert job is not None
    values = [getattr(job, name) for name in JOB_COLUMNS]
    created = values[-1]  # SQLite gives it back naive (UTC), PostgreSQL aware
    values[-1] = created.replace(tzinfo=created.tzinfo or timezone.utc)
    return tuple(values)


def test_job_rows_read_back_as_sqlalchemy_wrote_them(sessions: sessionmaker[Session]) -> None:
    bulk = [job_row(n) for n in range(4)]
    reference = [job_row(n) for n in range(4)]
    with sessions() as session, session.begin():
        insert_rows(session, Job, JOB_COLUMNS, bulk)
        session.execute(insert(Job), [dict(zip(JOB_COLUMNS, row, strict=True))
                                      for row in reference])
    with sessions() as session:
        for ours, theirs in zip(bulk, reference, strict=True):
            got, expected = read_job(session, str(ours[0])), read_job(session, str(theirs[0]))
            assert got[1:] == expected[1:]
            assert got[1:] == ours[1:]  # and both are what was written
        # stored as SQLAlchemy stores them, not only read back alike (SQLite: the
        # Boolean as the integer 1 / 0, the datetime as SQLAlchemy's text)
        columns = ", ".join(JOB_COLUMNS[1:])
        for ours, theirs in zip(bulk, reference, strict=True):
            raw_ours, raw_theirs = (session.execute(text(
                f"SELECT {columns} FROM jobs WHERE id = :id"), {"id": str(row[0])}).one()
                for row in (ours, theirs))
            assert tuple(raw_ours) == tuple(raw_theirs)
        # a column left out takes its server default on both paths
        job = session.get(Job, str(bulk[0][0]))
        assert job is not None and job.status is JobStatus.QUEUED and job.error is None


def test_token_rows_keep_their_floats_and_flags(sessions: sessionmaker[Session]) -> None:
    job_id = str(job_row(1)[0])
    with sessions() as session, session.begin():
        insert_rows(session, Job, JOB_COLUMNS, [(job_id, *job_row(1)[1:])])
    rows = [(job_id, 0, p, 1000 + p, f" tök{p}", -math.pi * (p + 1) / 7, p % 2 == 0)
            for p in range(2000)]
    rows.append((job_id, 1, 0, 7, "", -math.inf, True))  # a token the model rules out
    with sessions() as session, session.begin():
        insert_rows(session, Token, TOKEN_COLUMNS, rows)
    with sessions() as session:
        stored = session.execute(select(*(getattr(Token, c) for c in TOKEN_COLUMNS)).order_by(
            Token.sequence_index, Token.position)).all()
    assert [tuple(row) for row in stored] == rows


def test_a_refused_row_is_an_integrity_error_and_stores_nothing(
        sessions: sessionmaker[Session]) -> None:
    job_id = str(job_row(2)[0])
    with sessions() as session, session.begin():
        insert_rows(session, Job, JOB_COLUMNS, [(job_id, *job_row(2)[1:])])
    rows = [(job_id, 0, p, p, "t", -1.0, False) for p in range(10)]
    rows.append((job_id, 0, 3, 3, "t", -1.0, False))  # the same position twice
    with pytest.raises(IntegrityError), sessions() as session, session.begin():
        insert_rows(session, Token, TOKEN_COLUMNS, rows)
    with sessions() as session:
        assert session.scalars(select(Token).where(Token.job_id == job_id)).all() == []


def test_later_job_rows_sort_after_earlier_ones(sessions: sessionmaker[Session]) -> None:
    """Datetimes are stored in the format SQLAlchemy writes, so SQL orders rows from
    both paths by time (on SQLite a text comparison: another format, an ISO 'T' say,
    would sort every bulk row after the same day's SQLAlchemy rows)."""
    rows = [job_row(n) for n in range(3)]  # 05:00:00, :01, :02
    with sessions() as session, session.begin():
        insert_rows(session, Job, JOB_COLUMNS, [rows[0], rows[2]])
        between = dict(zip(JOB_COLUMNS, rows[1], strict=True))
        between["created_at"] += timedelta(microseconds=1)
        session.execute(insert(Job), [between])
    with sessions() as session:
        order = session.scalars(select(Job.id).order_by(Job.created_at)).all()
    assert order == [rows[0][0], rows[1][0], rows[2][0]]
