"""A job's output as table rows (inserted by :func:`api_client.bulk_insert.insert_rows`).

Both ways of storing results (:mod:`worker.persistence`, one job;
:mod:`worker.bulk_persistence`, a batch) turn outputs into the same rows here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, delete
from sqlalchemy.orm import Session

from api_client.schema import Artifact, Job, Token, TopLogprob
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


#: A UTF-16 surrogate on its own: no UTF-8 encoding exists for it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
#: The job row's length-limited string columns (SQLite ignores the limits, PostgreSQL
#: refuses a longer value).
_JOB_STRING_LENGTHS = {column.name: column.type.length for column in Job.__table__.columns
                       if isinstance(column.type, String) and column.type.length}
_FINISH_REASON_LENGTH = SequenceRow.__table__.c.finish_reason.type.length


def storable_text(value: str) -> str:
    """PostgreSQL text cannot hold NUL (GPT-2 has a token for byte 0), and no database
    a lone surrogate (a server's broken escape): both stored as U+FFFD on every
    database alike (``token_id`` keeps the exact token)."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            value = _LONE_SURROGATE.sub("\ufffd", value)
    return value


def storable_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """A job's provenance values as its row holds them: strings made storable and cut
    to their column's length (a server's ``system_fingerprint`` of any length), so
    PostgreSQL stores what SQLite does instead of failing the job."""
    stored = dict(provenance)
    for key, value in provenance.items():
        if isinstance(value, str):
            stored[key] = storable_text(value)[: _JOB_STRING_LENGTHS.get(key)]
    return stored


def storable_finish_reason(reason: str | None) -> str | None:
    return None if reason is None else storable_text(reason)[:_FINISH_REASON_LENGTH]


def output_rows(items: Iterable[tuple[str, ProbeOutput]]) -> OutputRows:
    """Every sequence, token and top-k row of ``(job_id, output)`` pairs."""
    sequences: list[tuple[Any, ...]] = []
    tokens: list[tuple[Any, ...]] = []
    alternatives: list[tuple[Any, ...]] = []
    for job_id, output in items:
        for seq in output.sequences:
            all_tokens = (*seq.prompt_tokens, *seq.tokens)
            text = None if seq.text is None else storable_text(seq.text)
            sequences.append((job_id, seq.index, text, storable_finish_reason(seq.finish_reason),
                              len(all_tokens),
                              sum(t.generated for t in all_tokens), seq.sum_logprob))
            index = seq.index
            for tok in all_tokens:
                tokens.append((job_id, index, tok.position, tok.token_id, storable_text(tok.token),
                               tok.logprob, tok.generated))
                for rank, alt in enumerate(tok.top_logprobs):
                    alternatives.append((job_id, index, tok.position, rank, alt.token_id,
                                         storable_text(alt.token), alt.logprob))
    return OutputRows(sequences, tokens, alternatives)


def delete_rows(session: Session, job_ids: Sequence[str]) -> None:
    """Remove every result row (top-k, tokens, sequences, artifacts) of ``job_ids`` in
    the session's transaction: what an earlier attempt of a job may have left."""
    for table in (TopLogprob, Token, SequenceRow, Artifact):
        session.execute(delete(table.__table__).where(table.job_id.in_(list(job_ids))))
