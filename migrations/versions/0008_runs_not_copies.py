"""determinism: ``reuse`` is not part of a configuration; reused jobs are not runs

``jobs.config_hash`` leaves out the spec fields that say how a probe is run, not
what it asks; ``reuse`` joins ``seed`` and ``device`` there, so a probe repeated
with ``reuse=False`` (as ``client.repeat`` does) lands in the same configuration
as the same probe submitted plainly. Existing rows are rehashed.

``determinism_report`` counts only jobs that computed their result: a job answered
from an identical job's rows (``reused_from`` set) holds a copy, which would make
every configuration look deterministic.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here (not imported from api_client.determinism): this revision's meaning.
RUN_FIELDS_BEFORE = frozenset({"seed", "device"})
RUN_FIELDS_AFTER = frozenset({"seed", "device", "reuse"})



def _view_of_0003() -> str:
    """The view as revision 0003 created it (loaded from its file: alembic loads
    revisions by path, not as a package)."""
    path = Path(__file__).with_name("0003_artifacts_determinism.py")
    spec = importlib.util.spec_from_file_location("logprobe_migration_0003", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.DETERMINISM_REPORT)


REPORT_BEFORE = _view_of_0003()
REPORT_AFTER = REPORT_BEFORE.replace(
    "WHERE status = 'succeeded' AND config_hash IS NOT NULL\n",
    "WHERE status = 'succeeded' AND config_hash IS NOT NULL AND reused_from IS NULL\n",
).replace(
    "WHERE j.status = 'succeeded' AND j.config_hash IS NOT NULL AND t.logprob IS NOT NULL",
    "WHERE j.status = 'succeeded' AND j.config_hash IS NOT NULL AND j.reused_from IS NULL\n"
    "      AND t.logprob IS NOT NULL",
)
assert REPORT_AFTER.count("reused_from IS NULL") == 2, "0003's view text changed"

_jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("spec", sa.JSON),
                 sa.column("config_hash", sa.String))
_BATCH = 2000


def _config_hash(spec: dict[str, Any], run_fields: frozenset[str]) -> str:
    data = {k: v for k, v in spec.items() if k not in run_fields}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _batches(rows: Iterable[Any]) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _rehash(run_fields: frozenset[str]) -> None:
    """Recompute ``config_hash`` of every job whose spec names ``reuse``."""
    connection = op.get_bind()
    names_reuse = sa.cast(_jobs.c.spec, sa.Text).like('%"reuse"%')
    rows = connection.execute(
        sa.select(_jobs.c.id, _jobs.c.spec, _jobs.c.config_hash)
        .where(_jobs.c.config_hash.is_not(None), names_reuse)
    ).all()
    update = (sa.update(_jobs).where(_jobs.c.id == sa.bindparam("job_id"))
              .values(config_hash=sa.bindparam("new_hash")))
    changed = ({"job_id": row.id, "new_hash": new}
               for row in rows
               if (new := _config_hash(row.spec, run_fields)) != row.config_hash)
    for batch in _batches(changed):
        connection.execute(update, batch)


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS determinism_report")
    op.execute(REPORT_AFTER)
    _rehash(RUN_FIELDS_AFTER)


def downgrade() -> None:
    _rehash(RUN_FIELDS_BEFORE)
    op.execute("DROP VIEW IF EXISTS determinism_report")
    op.execute(REPORT_BEFORE)
