"""Many jobs in and out of SQL at once: claim a message's jobs, store a batch's rows.

The same guarantees as :mod:`worker.persistence` (one transaction, idempotent by
job id, a finished job is never written again), for a whole batch: one
transaction claims every job of a message, one stores every result of a batch.
Token and top-k rows go in with PostgreSQL ``COPY`` (psycopg 3), on SQLite as
``INSERT`` statements of many rows (:mod:`api_client.bulk_insert`), elsewhere one
executemany per table.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session

from api_client.bulk_insert import (
    converted,
    driver_value_processors,
    insert_rows,
    sqlite_bind_processor,
    sqlite_statement_values,
)
from api_client.determinism import output_hash
from api_client.schema import Job, JobStatus, Token, TopLogprob
from api_client.schema import Sequence as SequenceRow

from .backends.base import ProbeOutput
from .output_rows import (
    SEQUENCE_COLUMNS,
    TOKEN_COLUMNS,
    TOP_COLUMNS,
    delete_rows,
    output_rows,
    storable_provenance,
)
from .persistence import DEFAULT_MAX_ATTEMPTS

log = logging.getLogger(__name__)

_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)

def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Claim:
    """What :func:`claim_message` did with a message's jobs."""

    #: The jobs claimed (``running``, ``attempts`` counted up), in the message's order.
    claimed: list[str]
    #: ``{job_id: queue}`` of the unfinished jobs of a message delivered again after
    #: its worker stopped, left unclaimed, to be sent again one message each.
    alone: dict[str, str] = field(default_factory=dict)


def claim_many(session: Session, job_ids: Sequence[str], worker: str,
               max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[str]:
    """Claim every runnable job of ``job_ids`` in one transaction; return those claimed.

    A claimed job is ``running``, its ``attempts`` counted up. Finished jobs (a
    redelivered message) are not claimed; a job claimed ``max_attempts`` times before
    (its worker died each time: killed, out of memory) is failed instead.
    """
    return claim_message(session, job_ids, worker, max_attempts).claimed


def claim_message(session: Session, job_ids: Sequence[str], worker: str,
                  max_attempts: int = DEFAULT_MAX_ATTEMPTS, *, split: bool = False) -> Claim:
    """:func:`claim_many` for a message's jobs; with ``split``, a message whose worker
    stopped before is not claimed but split.

    Every delivery of a message counts up the attempts of all its unfinished jobs: if
    one of them kills its worker (out of memory, a segfault), its message mates, which
    never ran, would be given up with it. So when more than one runnable job is left
    and one of them was claimed before (``attempts`` >= 1: the message was delivered
    again), none is claimed: they are returned in ``Claim.alone``, with their queue,
    for the caller to send one message each, whose attempts are then their own. Jobs
    past ``max_attempts`` are failed as usual. The first delivery reads and writes
    exactly what :func:`claim_many` does.
    """
    if not job_ids:
        return Claim([])
    now = _now()
    # Both statements find the jobs by primary key alone. (One UPDATE with the status
    # and attempts conditions was slower: planned as a scan of every queued job's
    # index entry, or of the table, for each message of a sweep.)
    with session.begin():
        rows = session.execute(
            select(Job.id, Job.status, Job.attempts)
            .where(Job.id.in_(list(job_ids))).with_for_update()
        ).all()
        runnable = {r.id for r in rows if r.status in _UNFINISHED and r.attempts < max_attempts}
        given_up = [r for r in rows if r.status in _UNFINISHED and r.attempts >= max_attempts]
        alone: dict[str, str] = {}
        if split and len(runnable) > 1 and any(
                r.attempts >= 1 for r in rows if r.id in runnable):
            alone = dict(session.execute(  # type: ignore[arg-type]
                select(Job.id, Job.queue).where(Job.id.in_(runnable))).tuples().all())
            runnable = set()
        if runnable:
            session.execute(
                update(Job).where(Job.id.in_(runnable))
                .values(status=JobStatus.RUNNING, attempts=Job.attempts + 1, worker=worker,
                        started_at=now)
                .execution_options(synchronize_session=False)
            )
        for row in given_up:
            session.execute(
                update(Job).where(Job.id == row.id).values(
                    status=JobStatus.FAILED, error_type="WorkerLost", finished_at=now,
                    error=(f"the worker running this job stopped {row.attempts} times (killed, "
                           "or out of memory) before it finished; not trying again. Lower the "
                           "input size or the batch, or run it on a larger machine"),
                ).execution_options(synchronize_session=False)
            )
    return Claim([job_id for job_id in job_ids if job_id in runnable], alone)


def store_outputs(session: Session, items: Sequence[tuple[str, ProbeOutput]],
                  extra: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """Store finished jobs' rows and mark them succeeded, all in one transaction.

    Jobs no longer running (cancelled meanwhile, or stored by another attempt) are
    skipped; returns the ids stored. ``extra[job_id]`` adds job-row values.
    """
    if not items:
        return []
    extra = extra or {}
    ids = [job_id for job_id, _ in items]
    with session.begin():
        # By primary key alone, status checked here (see claim_many).
        attempts = {row.id: row.attempts for row in session.execute(
            select(Job.id, Job.status, Job.attempts).where(Job.id.in_(ids)).with_for_update()
        ) if row.status == JobStatus.RUNNING}
        todo = [(job_id, out) for job_id, out in items if job_id in attempts]
        if not todo:
            return []
        todo_ids = [job_id for job_id, _ in todo]
        retried = [job_id for job_id in todo_ids if attempts[job_id] > 1]
        if retried:  # rows an earlier attempt may have left (first attempts have none)
            delete_rows(session, retried)
        rows = output_rows(todo)
        insert_rows(session, SequenceRow, SEQUENCE_COLUMNS, rows.sequences)
        insert_rows(session, Token, TOKEN_COLUMNS, rows.tokens)
        insert_rows(session, TopLogprob, TOP_COLUMNS, rows.alternatives)
        now = _now()
        by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for job_id, output in todo:
            values = {
                "id": job_id,
                "status": JobStatus.SUCCEEDED,
                "loss": output.loss,
                "sum_logprob": output.sum_logprob,
                "num_scored_tokens": output.num_scored_tokens,
                "output_hash": output_hash(output.sequences),
                "partial": False,
                "error": None,
                "error_type": None,
                "finished_at": now,
                **storable_provenance(output.provenance),
                **extra.get(job_id, {}),
            }
            by_keys[tuple(sorted(values))].append(values)
        for keys, group in by_keys.items():
            _update_jobs(session, keys, group)
    return todo_ids


def _update_jobs(session: Session, keys: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """Set ``keys`` (``id`` among them) of each job in ``rows`` to its values.

    On PostgreSQL (psycopg 3), one ``UPDATE jobs ... FROM unnest(<one array per
    column>)`` for all rows: one statement planned and run, where an executemany runs
    one UPDATE per job (each planned: see ``plan_cache_mode`` in
    :mod:`api_client.database`), and its text depends only on ``keys``. On SQLite
    ``UPDATE ... FROM (VALUES ...)`` (:func:`_update_jobs_sqlite`). Elsewhere one
    executemany.
    """
    jobs = Job.__table__
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        arrays = []
        for key, process in zip(keys, driver_value_processors(jobs, keys, dialect),
                                strict=True):
            column_values = [row[key] for row in rows]
            arrays.append([process(v) for v in column_values] if process else column_values)
        ids = arrays[list(keys).index("id")]
        connection.exec_driver_sql(_update_from_arrays(tuple(keys), dialect), (*arrays, ids))
        return
    if dialect.name == "sqlite" and sqlite3.sqlite_version_info >= (3, 33):
        _update_jobs_sqlite(connection, keys, rows)
        return
    statement = (update(jobs).where(jobs.c.id == bindparam("v_id"))
                 .values({key: bindparam(f"v_{key}") for key in keys if key != "id"}))
    connection.execute(statement, [{f"v_{key}": value for key, value in row.items()}
                                   for row in rows])


def _update_jobs_sqlite(connection: Connection, keys: Sequence[str],
                        rows: list[dict[str, Any]]) -> None:
    """:func:`_update_jobs` on SQLite (3.33+: ``UPDATE ... FROM``): ``UPDATE jobs SET
    <key> = given.columnN, ... FROM (VALUES (?, ...), ...) AS given WHERE jobs.id =
    given.column1`` (each job found by primary key), in few statements
    (:func:`~api_client.bulk_insert.sqlite_statement_values`), not one per job: sqlite3
    releases the GIL for each statement it runs and waits to get it back while
    another thread runs Python (:func:`~api_client.bulk_insert.sqlite_insert_rows`).
    Values are converted as SQLAlchemy would (enums to names, datetimes to text)."""
    jobs = Job.__table__
    dialect = connection.dialect
    ordered = ["id", *(key for key in keys if key != "id")]
    processors = [sqlite_bind_processor(jobs.c[key].type, dialect) for key in ordered]
    values = converted([tuple(row[key] for key in ordered) for row in rows], processors)
    assignments = ", ".join(f"{key} = given.column{number}"
                            for number, key in enumerate(ordered[1:], start=2))
    one_row = f"({', '.join('?' for _ in ordered)})"
    raw = connection.connection.driver_connection
    for count, flat in sqlite_statement_values(raw, values):
        connection.exec_driver_sql(
            f"UPDATE jobs SET {assignments} FROM (VALUES {', '.join([one_row] * count)}) "
            "AS given WHERE jobs.id = given.column1", tuple(flat))


@functools.cache
def _update_from_arrays(keys: tuple[str, ...], dialect: Dialect) -> str:
    """``UPDATE jobs`` of ``keys`` from one array parameter per key (``%s``, in order),
    each cast to an array of its column's type (an array of only NULLs has none), and
    the ids' array again."""
    jobs = Job.__table__
    arrays = ", ".join(f"CAST(%s AS {jobs.c[key].type.compile(dialect=dialect)}[])"
                       for key in keys)
    assignments = ", ".join(f"{key} = given.{key}" for key in keys if key != "id")
    # "jobs.id = ANY(the ids)" finds the rows by primary key, whatever the planner
    # thinks of the table's size (a join alone was planned as a scan of every job).
    return (f"UPDATE jobs SET {assignments} FROM unnest({arrays}) AS given "
            f"({', '.join(keys)}) WHERE jobs.id = ANY(CAST(%s AS VARCHAR[])) "
            "AND jobs.id = given.id")
