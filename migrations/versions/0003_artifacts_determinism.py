"""artifacts table, jobs.config_hash / jobs.output_hash, determinism_report view

Revision ID: 0003
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _differs(*columns: str) -> str:
    """1 when the runs of a configuration saw more than one value (NULL counts as one)."""
    tests = [
        f"COUNT(DISTINCT {c}) + MAX(CASE WHEN {c} IS NULL THEN 1 ELSE 0 END) > 1"
        for c in columns
    ]
    return "CASE WHEN " + " OR ".join(tests) + " THEN 1 ELSE 0 END"


# Plain SQL that SQLite and PostgreSQL both run. One row per probe configuration
# (jobs.config_hash), over its succeeded runs.
DETERMINISM_REPORT = f"""
CREATE VIEW determinism_report AS
WITH runs AS (
    SELECT
        config_hash,
        MIN(kind) AS kind,
        MIN(model) AS model,
        COUNT(*) AS runs,
        COUNT(DISTINCT output_hash) AS distinct_outputs,
        MAX(loss) - MIN(loss) AS max_abs_dloss,
        {_differs("seed")} AS seed_differs,
        {_differs("model_revision")} AS revision_differs,
        {_differs("torch_version", "transformers_version", "openai_version")}
            AS library_versions_differ,
        {_differs("device", "device_name")} AS device_differs,
        {_differs("system_fingerprint")} AS fingerprint_differs,
        {_differs("batch_size")} AS batch_size_differs,
        {_differs("dtype")} AS dtype_differs,
        MIN(CASE WHEN deterministic THEN 1 ELSE 0 END) AS all_deterministic_mode,
        MIN(batch_size) AS min_batch_size,
        MAX(batch_size) AS max_batch_size,
        MIN(created_at) AS first_submitted,
        MAX(finished_at) AS last_finished
    FROM jobs
    WHERE status = 'succeeded' AND config_hash IS NOT NULL
    GROUP BY config_hash
),
token_spreads AS (
    -- the same token at the same position of runs with the same output tokens
    SELECT j.config_hash AS config_hash, MAX(t.logprob) - MIN(t.logprob) AS spread
    FROM tokens t JOIN jobs j ON j.id = t.job_id
    WHERE j.status = 'succeeded' AND j.config_hash IS NOT NULL AND t.logprob IS NOT NULL
    GROUP BY j.config_hash, j.output_hash, t.sequence_index, t.position
),
spreads AS (
    SELECT config_hash, MAX(spread) AS max_abs_dlogprob
    FROM token_spreads
    GROUP BY config_hash
)
SELECT
    r.config_hash,
    r.kind,
    r.model,
    r.runs,
    r.distinct_outputs,
    s.max_abs_dlogprob,
    r.max_abs_dloss,
    CASE WHEN r.distinct_outputs <= 1 AND COALESCE(s.max_abs_dlogprob, 0) = 0
              AND COALESCE(r.max_abs_dloss, 0) = 0
         THEN 1 ELSE 0 END AS deterministic,
    r.seed_differs,
    r.revision_differs,
    r.library_versions_differ,
    r.device_differs,
    r.fingerprint_differs,
    r.batch_size_differs,
    r.dtype_differs,
    r.all_deterministic_mode,
    r.min_batch_size,
    r.max_batch_size,
    r.first_submitted,
    r.last_finished
FROM runs r LEFT JOIN spreads s ON s.config_hash = r.config_hash
"""


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("config_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("output_hash", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_config_hash"), ["config_hash"], unique=False)

    op.create_table(
        "artifacts",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("num_bytes", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_artifacts_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "name", name=op.f("pk_artifacts")),
    )
    op.execute(DETERMINISM_REPORT)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS determinism_report")
    op.drop_table("artifacts")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_config_hash"))
        batch_op.drop_column("output_hash")
        batch_op.drop_column("config_hash")
