"""Job rows in and out of SQL: store one job's result or its error.

Every write that ends a job is one transaction and idempotent by job id: rows of
an earlier, interrupted attempt are replaced, and a job that already finished is
never written again (a redelivered message must not store results twice).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import insert, select, update
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


@dataclass(frozen=True)
class ClaimRow:
    """What a job's row says of its claim (:func:`claims_of`)."""

    id: str
    status: JobStatus
    #: The worker that claimed it last (``jobs.worker``), None if none ever did.
    worker: str | None
    #: How many times it was claimed; a claim counts it up.
    attempts: int
    #: When it was claimed (while it runs; the store sets when its compute began).
    started_at: datetime | None
    queue: str


def claims_of(session: Session, job_ids: Collection[str]) -> list[ClaimRow]:
    """The claim columns of the jobs of ``job_ids`` (those that exist), one query."""
    if not job_ids:
        return []
    rows = session.execute(
        select(Job.id, Job.status, Job.worker, Job.attempts, Job.started_at, Job.queue)
        .where(Job.id.in_(list(job_ids)))
    ).all()
    return [ClaimRow(r.id, r.status, r.worker, r.attempts, _aware(r.started_at), r.queue)
            for r in rows]


def _aware(moment: datetime | None) -> datetime | None:
    """``moment`` with its time zone (SQLite returns the stored UTC time without one)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


def store_failure(session: Session, job_id: str, error: BaseException | str, *,
                  error_type: str | None = None, started_at: datetime | None = None,
                  claim: tuple[str, int] | None = None,
                  provenance: Mapping[str, Any] | None = None) -> bool:
    """Mark an unfinished job failed with its error text (no traceback, no secrets);
    ``started_at``, if given, is when it began; ``provenance``, provenance columns it
    still records (an OpenAI job's request and seed). With ``claim = (worker, attempts)``
    only a job still ``running`` under that claim is failed (``jobs.worker`` and
    ``jobs.attempts`` as the claim left them: no later claim took it over), as
    Celery's backstop fails the jobs its task claimed
    (:func:`worker.runner.fail_unfinished`). Returns whether the job was failed."""
    if isinstance(error, BaseException):
        kind, message = type(error).__name__, str(error) or type(error).__name__
    else:
        kind, message = "Error", error
    error_type = error_type or kind
    conditions = [Job.id == job_id, Job.status.in_(_UNFINISHED)] if claim is None else [
        Job.id == job_id, Job.status == JobStatus.RUNNING, Job.worker == claim[0],
        Job.attempts == claim[1]]
    with session.begin():
        result = session.execute(
            update(Job)
            .where(*conditions)
            .values(status=JobStatus.FAILED, error=message, error_type=error_type,
                    finished_at=_now(), **_start(started_at),
                    **storable_provenance(provenance or {}))
        )
    return bool(result.rowcount)


def store_cancelled(session: Session, job_id: str, message: str, *,
                    started_at: datetime | None = None,
                    provenance: Mapping[str, Any] | None = None) -> bool:
    """Mark an unfinished job cancelled without results (it was stopped before it
    computed anything); ``started_at``, if given, is when it began; ``provenance`` as
    in :func:`store_failure`."""
    with session.begin():
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(_UNFINISHED))
            .values(status=JobStatus.CANCELLED, error=message, error_type="Cancelled",
                    partial=False, finished_at=_now(), **_start(started_at),
                    **storable_provenance(provenance or {}))
        )
    return bool(result.rowcount)
