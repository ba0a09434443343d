"""Many jobs in and out of SQL at once: claim a message's jobs, store a batch's rows.

The same guarantees as :mod:`worker.persistence` (one transaction, idempotent by
job id, a finished job is never written again), for a whole batch: one
transaction claims every job of a message, one stores every result of a batch.
Token and top-k rows go in with PostgreSQL ``COPY`` (psycopg 3) or, on other
databases, one executemany per table.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from api_client.determinism import output_hash
from api_client.schema import Artifact, Job, JobStatus, Token, TopLogprob
from api_client.schema import Sequence as SequenceRow

from .backends.base import ProbeOutput
from .persistence import DEFAULT_MAX_ATTEMPTS

log = logging.getLogger(__name__)

_UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)

TOKEN_COLUMNS = ("job_id", "sequence_index", "position", "token_id", "token", "logprob",
                 "generated")
TOP_COLUMNS = ("job_id", "sequence_index", "position", "rank", "token_id", "token", "logprob")
SEQUENCE_COLUMNS = ("job_id", "sequence_index", "text", "finish_reason", "num_tokens",
                    "num_generated", "sum_logprob")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def claim_many(session: Session, job_ids: Sequence[str], worker: str,
               max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[str]:
    """Claim every runnable job of ``job_ids`` in one transaction; return those claimed.

    Same rules as :func:`worker.persistence.claim`: finished jobs are skipped, jobs
    whose worker died ``max_attempts`` times are failed instead.
    """
    if not job_ids:
        return []
    now = _now()
    with session.begin():
        rows = session.execute(
            select(Job.id, Job.status, Job.attempts)
            .where(Job.id.in_(list(job_ids))).with_for_update()
        ).all()
        runnable = {r.id for r in rows if r.status in _UNFINISHED and r.attempts < max_attempts}
        given_up = [r for r in rows if r.status in _UNFINISHED and r.attempts >= max_attempts]
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
    return [job_id for job_id in job_ids if job_id in runnable]


@dataclass
class OutputRows:
    """The rows of many jobs' outputs, as tuples in table column order."""

    sequences: list[tuple[Any, ...]]
    tokens: list[tuple[Any, ...]]
    alternatives: list[tuple[Any, ...]]


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL (GPT-2 has a token for byte 0): stored as U+FFFD
    on every database alike (``token_id`` keeps the exact token)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def output_rows(items: Iterable[tuple[str, ProbeOutput]]) -> OutputRows:
    sequences: list[tuple[Any, ...]] = []
    tokens: list[tuple[Any, ...]] = []
    alternatives: list[tuple[Any, ...]] = []
    for job_id, output in items:
        for seq in output.sequences:
            all_tokens = (*seq.prompt_tokens, *seq.tokens)
            text = None if seq.text is None else _text(seq.text)
            sequences.append((job_id, seq.index, text, seq.finish_reason, len(all_tokens),
                              sum(t.generated for t in all_tokens), seq.sum_logprob))
            index = seq.index
            for tok in all_tokens:
                tokens.append((job_id, index, tok.position, tok.token_id, _text(tok.token),
                               tok.logprob, tok.generated))
                for rank, alt in enumerate(tok.top_logprobs):
                    alternatives.append((job_id, index, tok.position, rank, alt.token_id,
                                         _text(alt.token), alt.logprob))
    return OutputRows(sequences, tokens, alternatives)


def insert_rows(session: Session, model: type, columns: Sequence[str],
                rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert ``rows`` (tuples in ``columns`` order) into ``model``'s table in the
    session's transaction: ``COPY`` on PostgreSQL (psycopg 3), executemany elsewhere."""
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name == "postgresql" and connection.dialect.driver == "psycopg":
        raw = connection.connection.driver_connection
        table = model.__table__.name  # type: ignore[attr-defined]
        statement = f"COPY {table} ({', '.join(columns)}) FROM STDIN"
        with raw.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[union-attr]
            for row in rows:
                copy.write_row(row)
        return
    connection.execute(insert(model), [dict(zip(columns, row, strict=True)) for row in rows])


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
        running = set(session.scalars(
            select(Job.id).where(Job.id.in_(ids), Job.status == JobStatus.RUNNING)
            .with_for_update()
        ))
        todo = [(job_id, out) for job_id, out in items if job_id in running]
        if not todo:
            return []
        todo_ids = [job_id for job_id, _ in todo]
        for table in (TopLogprob, Token, SequenceRow, Artifact):  # an interrupted attempt's
            session.execute(delete(table).where(table.job_id.in_(todo_ids)))
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
                **output.provenance,
                **extra.get(job_id, {}),
            }
            by_keys[tuple(sorted(values))].append(values)
        for group in by_keys.values():
            session.execute(update(Job), group)  # ORM bulk UPDATE by primary key
    return todo_ids
