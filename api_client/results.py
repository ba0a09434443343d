"""Result records: what a backend produces and what ``job.result()`` returns.

The worker builds these from model outputs and stores them as rows; the client
reads the rows back into the same records. Plain frozen dataclasses, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from .schema import Job, JobStatus, Sequence, Token, TopLogprob


@dataclass(frozen=True, slots=True)
class Alternative:
    """One of the most likely tokens at a position."""

    token_id: int | None
    token: str
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token at ``position`` of its sequence, with ``log p(token | tokens before it)``.

    ``logprob`` is None where nothing precedes the token (position 0 without BOS)
    or the backend returned none (OpenAI prompt tokens on chat completions).
    """

    position: int
    token_id: int | None
    token: str
    logprob: float | None
    generated: bool = False
    top_logprobs: tuple[Alternative, ...] = ()

    @property
    def prob(self) -> float | None:
        return None if self.logprob is None else math.exp(self.logprob)


@dataclass(frozen=True, slots=True)
class SequenceResult:
    """A scored text, or one generated continuation.

    ``tokens`` are what the probe asked about: every token of a scored text, or
    the generated tokens of a continuation; ``prompt_tokens`` are the prompt's.
    ``text`` is the scored text, or the continuation decoded as a whole.
    """

    index: int
    text: str | None
    tokens: tuple[TokenLogprob, ...]
    prompt_tokens: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None

    @property
    def token_ids(self) -> list[int | None]:
        return [t.token_id for t in self.tokens]

    @property
    def logprobs(self) -> list[float | None]:
        return [t.logprob for t in self.tokens]

    @property
    def sum_logprob(self) -> float | None:
        values = [t.logprob for t in self.tokens if t.logprob is not None]
        return math.fsum(values) if values else None


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one finished job, as stored in SQL."""

    job_id: str
    kind: str
    model: str
    status: JobStatus
    loss: float | None
    seed: int | None
    sequences: tuple[SequenceResult, ...]
    model_revision: str | None = None
    system_fingerprint: str | None = None
    #: True when the job was stopped early (cancelled, time limit): tokens so far only.
    partial: bool = False

    @property
    def tokens(self) -> tuple[TokenLogprob, ...]:
        """The tokens of the first (for a score probe, the only) sequence."""
        return self.sequences[0].tokens if self.sequences else ()

    @property
    def text(self) -> str | None:
        return self.sequences[0].text if self.sequences else None

    @property
    def sum_logprob(self) -> float | None:
        return self.sequences[0].sum_logprob if self.sequences else None


def read_result(session: Session, job: Job) -> ProbeResult:
    """Load a job's sequences, tokens and alternatives from SQL."""
    alternatives: dict[tuple[int, int], list[Alternative]] = {}
    for alt in session.scalars(
        select(TopLogprob)
        .where(TopLogprob.job_id == job.id)
        .order_by(TopLogprob.sequence_index, TopLogprob.position, TopLogprob.rank)
    ):
        alternatives.setdefault((alt.sequence_index, alt.position), []).append(
            Alternative(alt.token_id, alt.token, alt.logprob)
        )
    by_sequence: dict[int, list[TokenLogprob]] = {}
    for row in session.scalars(
        select(Token).where(Token.job_id == job.id).order_by(Token.sequence_index, Token.position)
    ):
        by_sequence.setdefault(row.sequence_index, []).append(
            TokenLogprob(
                position=row.position,
                token_id=row.token_id,
                token=row.token,
                logprob=row.logprob,
                generated=row.generated,
                top_logprobs=tuple(alternatives.get((row.sequence_index, row.position), ())),
            )
        )
    sequences = []
    for seq in session.scalars(
        select(Sequence).where(Sequence.job_id == job.id).order_by(Sequence.sequence_index)
    ):
        rows = by_sequence.get(seq.sequence_index, [])
        if job.kind == "score":
            tokens, prompt = tuple(rows), ()
        else:
            tokens = tuple(t for t in rows if t.generated)
            prompt = tuple(t for t in rows if not t.generated)
        sequences.append(SequenceResult(seq.sequence_index, seq.text, tokens, prompt,
                                        seq.finish_reason))
    return ProbeResult(
        job_id=job.id,
        kind=job.kind,
        model=job.model,
        status=job.status,
        loss=job.loss,
        seed=job.seed,
        sequences=tuple(sequences),
        model_revision=job.model_revision,
        system_fingerprint=job.system_fingerprint,
        partial=bool(job.partial),
    )
