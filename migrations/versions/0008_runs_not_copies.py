"""determinism: one configuration per question; reused jobs are not runs

``jobs.config_hash`` leaves out the spec fields that say how a probe is run, not
what it asks; ``reuse`` joins ``seed`` and ``device`` there, so a probe repeated
with ``reuse=False`` (as ``client.repeat`` does) lands in the same configuration
as the same probe submitted plainly. Specs now spell out the defaults they had
left unset (hf ``dtype`` float32, OpenAI ``openai_api`` completions, sampling
``temperature`` 1.0 and hf ``top_p`` 1.0), so naming a default changes neither
hash. Existing rows get the hashes the client computes now (``config_hash`` and
``spec_hash``, from their stored specs with those defaults filled in: old runs and
new runs of one probe share a report row, and old results are reused); their
stored specs are left as they were.

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

# Frozen here (not imported from api_client): this revision's meaning.
CONFIG_LEAVES_OUT_BEFORE = frozenset({"seed", "device"})
CONFIG_LEAVES_OUT_AFTER = frozenset({"seed", "device", "reuse"})


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
                 sa.column("config_hash", sa.String), sa.column("spec_hash", sa.String))
_PAGE = 2000


def _with_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the client writes it from this revision on: defaults spelled out."""
    filled = dict(spec)
    backend = filled.get("backend") or "hf"
    if backend == "hf" and filled.get("dtype") is None:
        filled["dtype"] = "float32"
    if backend == "openai" and filled.get("openai_api") is None:
        filled["openai_api"] = "completions"
    if filled.get("kind") == "generate" and filled.get("do_sample"):
        if filled.get("temperature") is None:
            filled["temperature"] = 1.0
        if backend == "hf" and filled.get("top_p") is None:
            filled["top_p"] = 1.0
    return filled


def _digest(spec: dict[str, Any], leave_out: frozenset[str]) -> str:
    data = {k: v for k, v in spec.items() if k not in leave_out}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _pages() -> Iterable[list[Any]]:
    """Every job's id, spec and hashes, a page at a time (by id: no long-held cursor)."""
    connection = op.get_bind()
    last = ""
    while True:
        page = connection.execute(
            sa.select(_jobs.c.id, _jobs.c.spec, _jobs.c.config_hash, _jobs.c.spec_hash)
            .where(_jobs.c.id > last).order_by(_jobs.c.id).limit(_PAGE)
        ).all()
        if not page:
            return
        yield page
        last = page[-1].id


def _rehash(upgrading: bool) -> None:
    """Set both hashes of every job as the client of the target revision computes them."""
    connection = op.get_bind()
    update = (sa.update(_jobs).where(_jobs.c.id == sa.bindparam("job_id"))
              .values(config_hash=sa.bindparam("new_config"), spec_hash=sa.bindparam("new_spec")))
    for page in _pages():
        changed = []
        for row in page:
            if not isinstance(row.spec, dict):
                continue
            spec = _with_defaults(row.spec) if upgrading else row.spec
            leave_out = CONFIG_LEAVES_OUT_AFTER if upgrading else CONFIG_LEAVES_OUT_BEFORE
            new_config = _digest(spec, leave_out) if row.config_hash is not None else None
            new_spec = _digest(spec, frozenset({"reuse"})) if row.spec_hash is not None \
                else None
            if (new_config, new_spec) != (row.config_hash, row.spec_hash):
                changed.append({"job_id": row.id, "new_config": new_config,
                                "new_spec": new_spec})
        if changed:
            connection.execute(update, changed)


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS determinism_report")
    op.execute(REPORT_AFTER)
    _rehash(upgrading=True)


def downgrade() -> None:
    _rehash(upgrading=False)  # from the stored specs as they are
    op.execute("DROP VIEW IF EXISTS determinism_report")
    op.execute(REPORT_BEFORE)
