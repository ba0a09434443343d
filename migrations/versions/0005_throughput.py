"""throughput: sweep_id, spec_hash and reused_from on jobs

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sweep_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("spec_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("reused_from", sa.String(length=32), nullable=True))
        batch.create_index(batch.f("ix_jobs_sweep_id"), ["sweep_id"], unique=False)
        batch.create_index(batch.f("ix_jobs_spec_hash"), ["spec_hash"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(batch.f("ix_jobs_spec_hash"))
        batch.drop_index(batch.f("ix_jobs_sweep_id"))
        batch.drop_column("reused_from")
        batch.drop_column("spec_hash")
        batch.drop_column("sweep_id")
