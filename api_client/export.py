"""Export query results or a list of jobs to CSV or Parquet files.

``logprobe export`` and :func:`export` share this: a SQL query, or job ids plus a
table/view to take their rows from (default ``token_view``: one row per token
with the job's model and provenance). JSON columns (``jobs.spec``,
``request_params``) are written as JSON text so both formats read back anywhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, text

from .errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from .client import Client

FORMATS = ("csv", "parquet")

#: Tables and views that a job list can be exported from, with the column that
#: holds the job id and the order rows come out in.
JOB_TABLES: dict[str, tuple[str, str]] = {
    "token_view": ("job_id", "job_id, sequence_index, position"),
    "tokens": ("job_id", "job_id, sequence_index, position"),
    "top_logprobs": ("job_id", "job_id, sequence_index, position, rank"),
    "sequences": ("job_id", "job_id, sequence_index"),
    "jobs": ("id", "created_at, id"),
}


def format_for(path: str | Path | None, format: str | None) -> str:
    """The export format: given, else from the file suffix, else CSV."""
    if format is None and path is not None:
        suffix = Path(path).suffix.lower().lstrip(".")
        format = {"pq": "parquet"}.get(suffix, suffix) or None
    format = format or "csv"
    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} is not supported: use one of "
                          f"{', '.join(FORMATS)} (--format, or a .csv / .parquet file name)")
    return format


def read_job_ids(lines: Iterable[str]) -> list[str]:
    """Job ids from text, one per line (``logprobe submit`` output); blanks and # skipped."""
    ids = []
    for line in lines:
        word = line.split("#", 1)[0].strip()
        if word:
            ids.append(word)
    return ids


def job_rows(client: Client, job_ids: Sequence[str], table: str = "token_view") -> pd.DataFrame:
    """All rows of ``table`` that belong to ``job_ids``, in a stable order."""
    import pandas as pd

    if table not in JOB_TABLES:
        raise ConfigError(f"cannot export jobs from {table!r}: use one of "
                          f"{', '.join(JOB_TABLES)}")
    if not job_ids:
        raise ConfigError("no job ids to export: pass --jobs ID ... or --jobs-file FILE")
    key, order = JOB_TABLES[table]
    query = text(f"SELECT * FROM {table} WHERE {key} IN :ids ORDER BY {order}").bindparams(
        bindparam("ids", expanding=True)
    )
    with client.engine.connect() as connection:
        return pd.read_sql_query(query, connection, params={"ids": list(job_ids)})


def _json_text(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else value


def portable(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with dict/list cells (JSON columns) as JSON text."""
    frame = frame.copy()
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].map(_json_text)
    return frame


def write_frame(frame: pd.DataFrame, path: str | Path, format: str | None = None) -> Path:
    """Write ``frame`` as CSV or Parquet (``format`` or the suffix of ``path``)."""
    format = format_for(path, format)
    frame = portable(frame)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ConfigError("Parquet export needs pyarrow: pip install 'logprobe[export]'"
                              ) from exc
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def export(
    client: Client,
    path: str | Path,
    *,
    query: str | None = None,
    params: dict[str, Any] | None = None,
    job_ids: Sequence[str] | None = None,
    table: str = "token_view",
    format: str | None = None,
) -> pd.DataFrame:
    """Write the rows of ``query``, or of ``table`` for ``job_ids``, to ``path``.

    Returns the exported frame (so a notebook can keep working with it).
    """
    frame = load(client, query=query, params=params, job_ids=job_ids, table=table)
    write_frame(frame, path, format)
    return frame


def load(
    client: Client,
    *,
    query: str | None = None,
    params: dict[str, Any] | None = None,
    job_ids: Sequence[str] | None = None,
    table: str = "token_view",
) -> pd.DataFrame:
    """The rows an export writes: ``query``'s, or ``table``'s for ``job_ids``."""
    if (query is None) == (job_ids is None):
        raise ConfigError("export needs either a SQL query or a list of job ids (not both)")
    if query is not None:
        return client.sql(query, params)
    return job_rows(client, job_ids or [], table)
