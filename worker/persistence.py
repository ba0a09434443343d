"""Job rows in and out of SQL: store one job's result or its error.

Every write that ends a job is one transaction and idempotent by job id: rows of
an earlier, interrupted attempt are replaced, and a job that already finished is
never written again (a redelivered message must not store results twice).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from api_client.bulk_insert import insert_rows
from api_client.determinism import output_hash
from api_client.schema import Artifact, Job, JobStatus, Sequence, Token, TopLogprob

from .backends.base import ProbeOutput
from .output_rows import (
    SEQUENCE_COLUMNS,
    TOKEN_COLUMNS,
    TOP_COLUMNS,
    delete_rows,
    output_rows,
    storable_provenance,
)

#: A job whose worker died this many times is failed instead of run again.
DEFAULT_MAX_ATTEMPTS = 3

_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _start(started_at: datetime | None) -> dict[str, datetime]:
    """The ``started_at`` value to write: when the job's own compute began, if it did
    (else the claim time stays)."""
    return {} if started_at is None else {"started_at": started_at}


def store_output(session: Session, job_id: str, output: ProbeOutput, *,
                 status: JobStatus = JobStatus.SUCCEEDED, partial: bool = False,
                 error: str | None = None, error_type: str | None = None,
                 started_at: datetime | None = None) -> bool:
    """Store a finished job's rows and mark it succeeded, in one transaction.

    A job stopped early (cancelled, or past its time limit) stores the rows it has
    with ``partial=True`` and ``status`` CANCELLED or FAILED and an ``error``.
    ``started_at``, if given, replaces the claim time: when the job's own compute began.
    Returns False (and writes nothing) if the job is no longer running, e.g. it
    was cancelled meanwhile or another attempt already stored it.
    """
    rows = output_rows([(job_id, output)])
    with session.begin():
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status is not JobStatus.RUNNING:
            return False
        delete_rows(session, [job_id])
        insert_rows(session, Sequence, SEQUENCE_COLUMNS, rows.sequences)
        insert_rows(session, Token, TOKEN_COLUMNS, rows.tokens)
        insert_rows(session, TopLogprob, TOP_COLUMNS, rows.alternatives)
        if output.artifacts:
            session.execute(insert(Artifact), [{"job_id": job_id, **a} for a in output.artifacts])
        values: dict[str, Any] = {
            "status": status,
            "partial": partial,
            "loss": output.loss,
            "sum_logprob": output.sum_logprob,
            "num_scored_tokens": output.num_scored_tokens,
            "output_hash": output_hash(output.sequences),
            "error": error,
            "error_type": error_type,
            "finished_at": _now(),
            **storable_provenance(output.provenance),
            **_start(started_at),
        }
        session.execute(update(Job).where(Job.id == job_id).values(**values))
    return True


def store_failure(session: Session, job_id: str, error: BaseException | str, *,
                  error_type: str | None = None, started_at: datetime | None = None) -> None:
    """Mark an unfinished job failed with its error text (no traceback, no secrets);
    ``started_at``, if given, is when it began."""
    if isinstance(error, BaseException):
        kind, message = type(error).__name__, str(error) or type(error).__name__
    else:
        kind, message = "Error", error
    error_type = error_type or kind
    with session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(_UNFINISHED))
            .values(status=JobStatus.FAILED, error=message, error_type=error_type,
                    finished_at=_now(), **_start(started_at))
        )


def store_cancelled(session: Session, job_id: str, message: str, *,
                    started_at: datetime | None = None) -> bool:
    """Mark an unfinished job cancelled without results (it was stopped before it
    computed anything); ``started_at``, if given, is when it began."""
    with session.begin():
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(_UNFINISHED))
            .values(status=JobStatus.CANCELLED, error=message, error_type="Cancelled",
                    partial=False, finished_at=_now(), **_start(started_at))
        )
    return bool(result.rowcount)
