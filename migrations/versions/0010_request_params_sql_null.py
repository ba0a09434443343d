"""request parameters of hf jobs answered by result reuse: SQL NULL, not JSON null

A job answered from an identical job's rows (``reused_from``) copies its original's
columns; the copy wrote an hf job's absent ``request_params`` as a JSON ``null``, so
``WHERE request_params IS NULL`` (the schema's "NULL for hf") missed every such
copy. The column now writes None as SQL NULL (``JSON(none_as_null=True)``), and
existing JSON nulls become SQL NULL. The downgrade leaves them NULL: a JSON null
meant nothing else.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE jobs SET request_params = NULL "
                   "WHERE json_typeof(request_params) = 'null'")
    else:  # SQLite keeps JSON as its text
        op.execute("UPDATE jobs SET request_params = NULL WHERE request_params = 'null'")


def downgrade() -> None:
    pass
