"""The SQL schema: one row per job, one per token, one per top-k alternative.

This is the system of record. Alembic migrations in ``migrations/`` create it;
the README documents every column.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    false,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from .db_base import Base

#: Longest queue name the ``jobs.queue`` column holds.
MAX_QUEUE_LENGTH = 128


class JobStatus(str, enum.Enum):
    QUEUED = "queued"  # row written at submit, message sent to the broker
    RUNNING = "running"  # a worker claimed it (attempts counts the claims)
    SUCCEEDED = "succeeded"  # results stored, in the same transaction as this status
    FAILED = "failed"  # error holds why; the worker went on serving
    CANCELLED = "cancelled"  # stopped on request; rows stored so far are partial

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def _status_enum() -> Enum:
    return Enum(
        JobStatus,
        name="job_status",
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    backend: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(512), index=True)
    status: Mapped[JobStatus] = mapped_column(_status_enum(), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    queue: Mapped[str] = mapped_column(String(MAX_QUEUE_LENGTH))

    # What ran: resolved at run time by the worker.
    model_revision: Mapped[str | None] = mapped_column(String(128))
    dtype: Mapped[str | None] = mapped_column(String(16))
    device: Mapped[str | None] = mapped_column(String(32))
    device_name: Mapped[str | None] = mapped_column(String(128))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    deterministic: Mapped[bool | None] = mapped_column(Boolean)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    torch_version: Mapped[str | None] = mapped_column(String(64))
    transformers_version: Mapped[str | None] = mapped_column(String(64))
    openai_version: Mapped[str | None] = mapped_column(String(64))
    system_fingerprint: Mapped[str | None] = mapped_column(String(128))
    # None is SQL NULL (hf jobs send no request), never a JSON null (migration 0010).
    request_params: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    # Determinism: jobs with the same config_hash asked the same question (set at submit:
    # sha256 of the canonical spec JSON without seed, device and reuse); output_hash is the
    # sha256 of the output token ids of every sequence (set when results are stored).
    config_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    output_hash: Mapped[str | None] = mapped_column(String(64))

    # What came out.
    loss: Mapped[float | None] = mapped_column(Float)
    sum_logprob: Mapped[float | None] = mapped_column(Float)
    num_scored_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(128))
    #: True when the stored rows are what the job had computed when it was cancelled
    #: or ran out of time, not a complete result.
    partial: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: Seconds the job may run (each attempt) before the worker stops it; None = default.
    time_limit: Mapped[int | None] = mapped_column(Integer)

    # Throughput (docs/throughput.md): the sweep a job belongs to and its place there
    # (0-based, in the order submitted), a hash of its spec (less the reuse flag) for
    # finding identical probes, and the finished job whose rows this one copied
    # instead of recomputing.
    sweep_id: Mapped[str | None] = mapped_column(String(32), index=True)
    sweep_index: Mapped[int | None] = mapped_column(Integer)
    spec_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    reused_from: Mapped[str | None] = mapped_column(String(32))

    # Who and when.
    worker: Mapped[str | None] = mapped_column(String(256))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    sequences: Mapped[list[Sequence]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True,
        order_by="Sequence.sequence_index",
    )


class Sequence(Base):
    """One scored text, or one generated continuation (``num_return_sequences`` rows)."""

    __tablename__ = "sequences"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    sequence_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str | None] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    num_tokens: Mapped[int] = mapped_column(Integer)
    num_generated: Mapped[int] = mapped_column(Integer)
    sum_logprob: Mapped[float | None] = mapped_column(Float)

    job: Mapped[Job] = relationship(back_populates="sequences")


class Token(Base):
    """One token of a sequence: prompt/scored tokens first, then generated ones."""

    __tablename__ = "tokens"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    sequence_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int | None] = mapped_column(Integer)
    token: Mapped[str] = mapped_column(Text)
    logprob: Mapped[float | None] = mapped_column(Float)
    generated: Mapped[bool] = mapped_column(Boolean)


#: Tables whose ``job_id`` foreign key PostgreSQL enforces once per statement, by
#: triggers (migration 0007), instead of row by row: token and top-k rows arrive by the
#: thousand in one ``COPY``, and the per-row check was 60% of its time. The guarantees
#: are the constraint's (orphans refused, rows deleted with their job); SQLite keeps
#: the declared constraint.
STATEMENT_CHECKED_TABLES = ("tokens", "top_logprobs")


def migrated_schema_includes(dialect: str) -> Callable[..., bool]:
    """Alembic's ``include_object`` for comparing these models with a migrated database:
    on PostgreSQL the foreign keys that triggers enforce are not constraints there."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool,
                compare_to: Any) -> bool:
        return not (dialect == "postgresql" and type_ == "foreign_key_constraint"
                    and obj.table.name in STATEMENT_CHECKED_TABLES)

    return include


class TopLogprob(Base):
    """The ``rank``-th most likely token at a position (rank 0 = most likely)."""

    __tablename__ = "top_logprobs"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    sequence_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int | None] = mapped_column(Integer)
    token: Mapped[str] = mapped_column(Text)
    logprob: Mapped[float] = mapped_column(Float)


class Artifact(Base):
    """A file in the artifact store that belongs to a job (``name``: logits, input_embeds)."""

    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    shape: Mapped[list[int]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(16))
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
