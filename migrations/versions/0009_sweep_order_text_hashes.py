"""sweep order; output hashes of tokens whose ids are unknown

``jobs.sweep_index``: a job's place in the sweep (or ``submit_many`` call) that
submitted it, 0-based. Every job of one submission has the same ``created_at``, so
ordering by it gave a sweep's rows back in id order, not in the order of the texts.
Jobs submitted before this revision have none.

``jobs.output_hash`` hashed each output token's id; OpenAI tokens have no id unless
the worker has the model's tiktoken encoding (``token_id`` NULL), so every OpenAI
output of the same length had one hash and the determinism report counted runs with
different texts as one output. A token without an id is now hashed by its text:
existing jobs with such tokens get the hash the worker computes now. Jobs whose
tokens all have ids (every Hugging Face job) keep theirs.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("kind", sa.String),
                 sa.column("output_hash", sa.String))
_sequences = sa.table("sequences", sa.column("job_id", sa.String),
                      sa.column("sequence_index", sa.Integer))
_tokens = sa.table("tokens", sa.column("job_id", sa.String),
                   sa.column("sequence_index", sa.Integer), sa.column("position", sa.Integer),
                   sa.column("token_id", sa.Integer), sa.column("token", sa.Text),
                   sa.column("generated", sa.Boolean))
_PAGE = 500


def _digest(outputs: list[list[Any]]) -> str:
    """Frozen here (not imported from api_client): this revision's output hash."""
    canonical = json.dumps(outputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _rehash(by_text: bool) -> None:
    """Set the output hash of every finished job that has a token without an id: ids
    and, for those tokens, texts (upgrade), or ids only, None for those (downgrade).
    The hash covers what ``SequenceResult.tokens`` holds: a scored text's tokens, a
    continuation's generated ones (not its prompt's)."""
    connection = op.get_bind()
    job_ids = list(connection.scalars(
        sa.select(_tokens.c.job_id).where(_tokens.c.token_id.is_(None)).distinct()
        .where(_tokens.c.job_id.in_(
            sa.select(_jobs.c.id).where(_jobs.c.output_hash.is_not(None))))
    ))
    update = (sa.update(_jobs).where(_jobs.c.id == sa.bindparam("job_id"))
              .values(output_hash=sa.bindparam("new_hash")))
    for start in range(0, len(job_ids), _PAGE):
        page = job_ids[start : start + _PAGE]
        outputs: dict[str, dict[int, list[Any]]] = {job_id: {} for job_id in page}
        generates = set(connection.scalars(
            sa.select(_jobs.c.id).where(_jobs.c.id.in_(page), _jobs.c.kind == "generate")))
        for row in connection.execute(
            sa.select(_sequences.c.job_id, _sequences.c.sequence_index)
            .where(_sequences.c.job_id.in_(page))
        ):
            outputs[row.job_id][row.sequence_index] = []
        for row in connection.execute(
            sa.select(_tokens.c.job_id, _tokens.c.sequence_index, _tokens.c.token_id,
                      _tokens.c.token, _tokens.c.generated)
            .where(_tokens.c.job_id.in_(page))
            .order_by(_tokens.c.job_id, _tokens.c.sequence_index, _tokens.c.position)
        ):
            if row.job_id in generates and not row.generated:
                continue  # a continuation's prompt
            key = row.token if by_text and row.token_id is None else row.token_id
            outputs[row.job_id].setdefault(row.sequence_index, []).append(key)
        connection.execute(update, [
            {"job_id": job_id, "new_hash": _digest([seqs[i] for i in sorted(seqs)])}
            for job_id, seqs in outputs.items()
        ])


def upgrade() -> None:
    op.add_column("jobs", sa.Column("sweep_index", sa.Integer(), nullable=True))
    _rehash(by_text=True)


def downgrade() -> None:
    _rehash(by_text=False)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sweep_index")
