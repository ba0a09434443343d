"""Job rows in and out of SQL: claim a job, store its result or its error.

Every write that ends a job is one transaction and idempotent by job id: rows of
an earlier, interrupted attempt are replaced, and a job that already finished is
never written again (a redelivered message must not store results twice).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import delete, insert, update
from sqlalchemy.orm import Session

from api_client.determinism import output_hash
from api_client.schema import Artifact, Job, JobStatus, Sequence, Token, TopLogprob

from .backends.base import ProbeOutput

#: A job whose worker died this many times is failed instead of run again.
DEFAULT_MAX_ATTEMPTS = 3

_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def claim(session: Session, job_id: str, worker: str, max_attempts: int) -> bool:
    """Mark a queued (or interrupted running) job as running; False if it must not run.

    A job that already finished (a redelivered message) is not claimed. A job
    claimed ``max_attempts`` times before (its worker died each time) is failed.
    """
    with session.begin():
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status not in _UNFINISHED:
            return False
        if job.attempts >= max_attempts:
            job.status = JobStatus.FAILED
            job.error_type = "WorkerLost"
            job.error = (
                f"the worker running this job stopped {job.attempts} times (killed, or out "
                "of memory) before it finished; not trying again. Lower the input size or "
                "the batch, or run it on a larger machine"
            )
            job.finished_at = _now()
            return False
        job.status = JobStatus.RUNNING
        job.attempts += 1
        job.worker = worker
        job.started_at = _now()
        return True


def _token_rows(job_id: str, output: ProbeOutput) -> tuple[list[dict], list[dict], list[dict]]:
    sequences, tokens, alternatives = [], [], []
    for seq in output.sequences:
        all_tokens = (*seq.prompt_tokens, *seq.tokens)
        sequences.append({
            "job_id": job_id,
            "sequence_index": seq.index,
            "text": seq.text,
            "finish_reason": seq.finish_reason,
            "num_tokens": len(all_tokens),
            "num_generated": sum(t.generated for t in all_tokens),
            "sum_logprob": seq.sum_logprob,
        })
        for tok in all_tokens:
            tokens.append({
                "job_id": job_id,
                "sequence_index": seq.index,
                "position": tok.position,
                "token_id": tok.token_id,
                "token": tok.token,
                "logprob": tok.logprob,
                "generated": tok.generated,
            })
            alternatives.extend(
                {
                    "job_id": job_id,
                    "sequence_index": seq.index,
                    "position": tok.position,
                    "rank": rank,
                    "token_id": alt.token_id,
                    "token": alt.token,
                    "logprob": alt.logprob,
                }
                for rank, alt in enumerate(tok.top_logprobs)
            )
    return sequences, tokens, alternatives


def _clear_rows(session: Session, job_id: str) -> None:
    for table in (TopLogprob, Token, Sequence, Artifact):
        session.execute(delete(table).where(table.job_id == job_id))


def _bulk_insert(session: Session, model: type, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    if rows:
        session.execute(insert(model), rows)


def store_output(session: Session, job_id: str, output: ProbeOutput, *,
                 status: JobStatus = JobStatus.SUCCEEDED, partial: bool = False,
                 error: str | None = None, error_type: str | None = None) -> bool:
    """Store a finished job's rows and mark it succeeded, in one transaction.

    A job stopped early (cancelled, or past its time limit) stores the rows it has
    with ``partial=True`` and ``status`` CANCELLED or FAILED and an ``error``.
    Returns False (and writes nothing) if the job is no longer running, e.g. it
    was cancelled meanwhile or another attempt already stored it.
    """
    sequences, tokens, alternatives = _token_rows(job_id, output)
    with session.begin():
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.status is not JobStatus.RUNNING:
            return False
        _clear_rows(session, job_id)
        _bulk_insert(session, Sequence, sequences)
        _bulk_insert(session, Token, tokens)
        _bulk_insert(session, TopLogprob, alternatives)
        _bulk_insert(session, Artifact, ({"job_id": job_id, **a} for a in output.artifacts))
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
            **output.provenance,
        }
        session.execute(update(Job).where(Job.id == job_id).values(**values))
    return True


def store_failure(session: Session, job_id: str, error: BaseException | str,
                  provenance: dict[str, Any] | None = None, *,
                  error_type: str | None = None) -> None:
    """Mark an unfinished job failed with its error text (no traceback, no secrets)."""
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
                    finished_at=_now(), **(provenance or {}))
        )


def store_cancelled(session: Session, job_id: str, message: str) -> bool:
    """Mark an unfinished job cancelled without results (it was stopped before it ran)."""
    with session.begin():
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(_UNFINISHED))
            .values(status=JobStatus.CANCELLED, error=message, error_type="Cancelled",
                    partial=False, finished_at=_now())
        )
    return bool(result.rowcount)
