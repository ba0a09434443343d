"""Answer a probe from an identical finished job's rows instead of recomputing it.

Identical = same ``jobs.spec_hash`` (the spec less its ``reuse`` flag, see
:mod:`api_client.reuse`) and the same resolved model revision, dtype, device
(``device_name``: the CPU or GPU model) and deterministic setting, which the
backend reports for the job about to run (:meth:`Backend.identity`). The copy is
made inside the database (``INSERT ... SELECT``), and the job records the original
in ``reused_from``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import delete, literal, select, update
from sqlalchemy.orm import Session

from api_client.schema import Job, JobStatus, Token, TopLogprob
from api_client.schema import Sequence as SequenceRow

#: Job-row values copied from the original: its result and what it ran on.
COPIED_COLUMNS = (
    "loss", "sum_logprob", "num_scored_tokens", "model_revision", "dtype", "device",
    "device_name", "seed", "deterministic", "batch_size", "torch_version",
    "transformers_version", "openai_version", "system_fingerprint", "request_params",
    "prompt_tokens", "completion_tokens", "output_hash",
)
IDENTITY_COLUMNS = ("model_revision", "dtype", "device_name", "deterministic")


def find_sources(
    session: Session, wanted: Sequence[tuple[str, str, Mapping[str, Any]]]
) -> dict[str, str]:
    """``{job_id: original_job_id}`` for each ``(job_id, spec_hash, identity)`` that has
    a succeeded identical job. One query for the lot."""
    hashes = {spec_hash for _, spec_hash, _ in wanted}
    if not hashes:
        return {}
    candidates: dict[str, list[Any]] = {}
    for row in session.execute(
        select(Job.id, Job.spec_hash, Job.reused_from,
               *(getattr(Job, column) for column in IDENTITY_COLUMNS))
        .where(Job.spec_hash.in_(hashes), Job.status == JobStatus.SUCCEEDED)
        .order_by(Job.finished_at)
    ):
        candidates.setdefault(row.spec_hash, []).append(row)
    sources: dict[str, str] = {}
    for job_id, spec_hash, identity in wanted:
        for row in candidates.get(spec_hash, ()):
            if row.id != job_id and all(
                getattr(row, column) == identity.get(column) for column in IDENTITY_COLUMNS
            ):
                sources[job_id] = row.reused_from or row.id
                break
    return sources


def copy_results(session: Session, sources: Mapping[str, str]) -> list[str]:
    """Give each running job ``sources[job]``'s rows and result, in one transaction.

    Returns the jobs done so; jobs no longer running are left alone.
    """
    if not sources:
        return []
    now = datetime.now(timezone.utc)
    with session.begin():
        running = set(session.scalars(
            select(Job.id).where(Job.id.in_(list(sources)), Job.status == JobStatus.RUNNING)
            .with_for_update()
        ))
        originals = {
            row.id: row for row in session.execute(
                select(Job.id, *[getattr(Job, c) for c in COPIED_COLUMNS])
                .where(Job.id.in_(set(sources.values())), Job.status == JobStatus.SUCCEEDED)
            )
        }
        done = []
        for job_id, source_id in sources.items():
            original = originals.get(source_id)
            if job_id not in running or original is None:
                continue
            for table in (TopLogprob, Token, SequenceRow):  # an interrupted attempt's rows
                session.execute(delete(table).where(table.job_id == job_id))
            for table in (SequenceRow, Token, TopLogprob):
                columns = [c.name for c in table.__table__.columns if c.name != "job_id"]
                session.execute(
                    table.__table__.insert().from_select(
                        ["job_id", *columns],
                        select(literal(job_id), *[table.__table__.c[c] for c in columns])
                        .where(table.__table__.c.job_id == source_id),
                    )
                )
            values = {c: getattr(original, c) for c in COPIED_COLUMNS}
            session.execute(
                update(Job).where(Job.id == job_id).values(
                    status=JobStatus.SUCCEEDED, reused_from=source_id, finished_at=now,
                    error=None, error_type=None, **values,
                ).execution_options(synchronize_session=False)
            )
            done.append(job_id)
    return done
