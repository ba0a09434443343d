"""openai_repeats view: did identical OpenAI requests return identical text?

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One row per (model, seed, exact request parameters, sequence index) over the
# succeeded OpenAI jobs: how often that request ran, how many different texts
# and system_fingerprints came back. Requests are "identical" when their stored
# request_params are equal as text (the worker writes them in a fixed key order).
VIEW_SQL = """
CREATE VIEW openai_repeats AS
SELECT
    j.model AS model,
    j.seed AS seed,
    CAST(j.request_params AS TEXT) AS request_params,
    s.sequence_index AS sequence_index,
    COUNT(*) AS runs,
    COUNT(DISTINCT s.text) AS distinct_texts,
    COUNT(DISTINCT s.sum_logprob) AS distinct_sum_logprobs,
    COUNT(DISTINCT COALESCE(j.system_fingerprint, '(null)')) AS distinct_fingerprints,
    CASE WHEN COUNT(DISTINCT s.text) <= 1 THEN 1 ELSE 0 END AS identical_text,
    CASE WHEN COUNT(DISTINCT COALESCE(j.system_fingerprint, '(null)')) > 1
         THEN 1 ELSE 0 END AS fingerprint_changed,
    MIN(j.created_at) AS first_run,
    MAX(j.created_at) AS last_run
FROM jobs j
JOIN sequences s ON s.job_id = j.id
WHERE j.backend = 'openai' AND j.status = 'succeeded' AND j.request_params IS NOT NULL
GROUP BY j.model, j.seed, CAST(j.request_params AS TEXT), s.sequence_index
"""


def upgrade() -> None:
    op.execute(VIEW_SQL)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS openai_repeats")
