"""Many rows into one table in one statement: PostgreSQL ``COPY`` (psycopg 3), else
an executemany. Used for job rows at submit and for result rows in the worker."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session


def insert_rows(session: Session, model: type, columns: Sequence[str],
                rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert ``rows`` (tuples in ``columns`` order) into ``model``'s table in the
    session's transaction.

    On PostgreSQL (psycopg 3) one ``COPY``: each value goes through its column type's
    bind processing first, as SQLAlchemy would send it (an enum's name, JSON); columns
    left out take their server defaults. Elsewhere one executemany.
    """
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        table = model.__table__  # type: ignore[attr-defined]
        processors = [table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
                      for name in columns]
        if any(processors):
            rows = [tuple(value if process is None else process(value)
                          for process, value in zip(processors, row, strict=True))
                    for row in rows]
        raw = connection.connection.driver_connection
        statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
        with raw.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[union-attr]
            for row in rows:
                copy.write_row(row)
        return
    connection.execute(insert(model), [dict(zip(columns, row, strict=True)) for row in rows])
