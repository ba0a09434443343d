"""A job's output as table rows, and inserting rows in bulk.

Both ways of storing results (:mod:`worker.persistence`, one job;
:mod:`worker.bulk_persistence`, a batch) turn outputs into the same rows here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

from api_client.schema import Artifact, Token, TopLogprob
from api_client.schema import Sequence as SequenceRow

from .backends.base import ProbeOutput

TOKEN_COLUMNS = ("job_id", "sequence_index", "position", "token_id", "token", "logprob",
                 "generated")
TOP_COLUMNS = ("job_id", "sequence_index", "position", "rank", "token_id", "token", "logprob")
SEQUENCE_COLUMNS = ("job_id", "sequence_index", "text", "finish_reason", "num_tokens",
                    "num_generated", "sum_logprob")


@dataclass
class OutputRows:
    """The rows of many jobs' outputs, as tuples in table column order."""

    sequences: list[tuple[Any, ...]]
    tokens: list[tuple[Any, ...]]
    alternatives: list[tuple[Any, ...]]


def storable_text(value: str) -> str:
    """PostgreSQL text cannot hold NUL (GPT-2 has a token for byte 0): stored as U+FFFD
    on every database alike (``token_id`` keeps the exact token)."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def output_rows(items: Iterable[tuple[str, ProbeOutput]]) -> OutputRows:
    """Every sequence, token and top-k row of ``(job_id, output)`` pairs."""
    sequences: list[tuple[Any, ...]] = []
    tokens: list[tuple[Any, ...]] = []
    alternatives: list[tuple[Any, ...]] = []
    for job_id, output in items:
        for seq in output.sequences:
            all_tokens = (*seq.prompt_tokens, *seq.tokens)
            text = None if seq.text is None else storable_text(seq.text)
            sequences.append((job_id, seq.index, text, seq.finish_reason, len(all_tokens),
                              sum(t.generated for t in all_tokens), seq.sum_logprob))
            index = seq.index
            for tok in all_tokens:
                tokens.append((job_id, index, tok.position, tok.token_id, storable_text(tok.token),
                               tok.logprob, tok.generated))
                for rank, alt in enumerate(tok.top_logprobs):
                    alternatives.append((job_id, index, tok.position, rank, alt.token_id,
                                         storable_text(alt.token), alt.logprob))
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


def delete_rows(session: Session, job_ids: Sequence[str]) -> None:
    """Remove every result row (top-k, tokens, sequences, artifacts) of ``job_ids`` in
    the session's transaction: what an earlier attempt of a job may have left."""
    for table in (TopLogprob, Token, SequenceRow, Artifact):
        session.execute(delete(table.__table__).where(table.job_id.in_(list(job_ids))))
