"""query views: token_view, loss_by_model, text_across_models

Plain SQL views over jobs / sequences / tokens / top_logprobs for the common
questions (docs/deployment.md has examples). The same SQL runs on SQLite and
PostgreSQL except for reading ``prepend_bos`` out of the JSON spec.

Revision ID: 0006
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ("text_across_models", "loss_by_model", "token_view")  # dependents first

TOKEN_VIEW = """
CREATE VIEW token_view AS
SELECT
    t.job_id,
    j.kind,
    j.backend,
    j.model,
    j.model_revision,
    j.dtype,
    j.device,
    j.status,
    j.seed,
    j.created_at,
    j.finished_at,
    t.sequence_index,
    s.text AS sequence_text,
    t.position,
    t.token_id,
    t.token,
    t.logprob,
    -t.logprob / 0.6931471805599453 AS surprisal_bits,
    t.generated,
    top.token_id AS top_token_id,
    top.token AS top_token,
    top.logprob AS top_logprob,
    CASE WHEN top.token_id IS NULL THEN NULL
         WHEN top.token_id = t.token_id THEN 1 ELSE 0 END AS is_top
FROM tokens t
JOIN jobs j ON j.id = t.job_id
JOIN sequences s ON s.job_id = t.job_id AND s.sequence_index = t.sequence_index
LEFT JOIN top_logprobs top
    ON top.job_id = t.job_id AND top.sequence_index = t.sequence_index
   AND top.position = t.position AND top.rank = 0
"""

LOSS_BY_MODEL = """
CREATE VIEW loss_by_model AS
SELECT
    j.backend,
    j.model,
    j.model_revision,
    j.dtype,
    {prepend_bos} AS prepend_bos,
    s.text,
    j.num_scored_tokens,
    COUNT(*) AS n_jobs,
    AVG(j.loss) AS loss,
    MIN(j.loss) AS min_loss,
    MAX(j.loss) AS max_loss,
    AVG(j.sum_logprob) AS sum_logprob,
    MAX(j.finished_at) AS last_finished_at
FROM jobs j
JOIN sequences s ON s.job_id = j.id AND s.sequence_index = 0
WHERE j.kind = 'score' AND j.status = 'succeeded'
GROUP BY j.backend, j.model, j.model_revision, j.dtype, {prepend_bos}, s.text,
         j.num_scored_tokens
"""

TEXT_ACROSS_MODELS = """
CREATE VIEW text_across_models AS
SELECT
    a.text,
    a.prepend_bos,
    a.model AS model_a,
    b.model AS model_b,
    a.loss AS loss_a,
    b.loss AS loss_b,
    b.loss - a.loss AS loss_diff,
    a.sum_logprob AS sum_logprob_a,
    b.sum_logprob AS sum_logprob_b,
    a.num_scored_tokens AS num_tokens_a,
    b.num_scored_tokens AS num_tokens_b,
    a.dtype AS dtype_a,
    b.dtype AS dtype_b,
    a.backend AS backend_a,
    b.backend AS backend_b,
    a.n_jobs AS n_jobs_a,
    b.n_jobs AS n_jobs_b
FROM loss_by_model a
JOIN loss_by_model b
  ON b.text = a.text AND b.prepend_bos = a.prepend_bos AND a.model < b.model
"""


def _prepend_bos_expression(dialect: str) -> str:
    if dialect == "postgresql":
        return "COALESCE(CAST(j.spec ->> 'prepend_bos' AS BOOLEAN), false)"
    return "COALESCE(json_extract(j.spec, '$.prepend_bos'), 0)"


def upgrade() -> None:
    prepend_bos = _prepend_bos_expression(op.get_bind().dialect.name)
    op.execute(TOKEN_VIEW)
    op.execute(LOSS_BY_MODEL.format(prepend_bos=prepend_bos))
    op.execute(TEXT_ACROSS_MODELS)


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
