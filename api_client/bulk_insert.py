"""Many rows into one table in one statement: PostgreSQL ``COPY`` (psycopg 3), SQLite
the driver's own executemany, else SQLAlchemy's. Used for job rows at submit and for
result rows in the worker."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import JSON, Boolean, Enum, Table, insert
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session


def driver_value_processors(table: Table, columns: Sequence[str], dialect: Dialect
                            ) -> list[Callable[[Any], Any] | None]:
    """Per column, the conversion SQLAlchemy applies to its values before the driver
    sees them, where psycopg cannot take them as they are (an enum's name, psycopg's
    JSON wrapper); None for the other columns."""
    return [table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if isinstance(table.c[name].type, (Enum, JSON)) else None
            for name in columns]


def converted(rows: Sequence[tuple[Any, ...]],
              processors: Sequence[Callable[[Any], Any] | None]) -> Sequence[tuple[Any, ...]]:
    """``rows`` with each value passed through its column's processor (None: as is).
    Only the columns that have one are touched (most have none)."""
    active = [(index, process) for index, process in enumerate(processors)
              if process is not None]
    if not active:
        return rows
    if len(active) == 1:
        (index, process), = active
        return [(*row[:index], process(row[index]), *row[index + 1:]) for row in rows]
    result = []
    for row in rows:
        values = list(row)
        for index, process in active:
            values[index] = process(values[index])
        result.append(tuple(values))
    return result


def insert_rows(session: Session, model: type, columns: Sequence[str],
                rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert ``rows`` (tuples in ``columns`` order) into ``model``'s table in the
    session's transaction.

    On PostgreSQL (psycopg 3) one ``COPY``: values of enum and JSON columns are
    converted first (:func:`driver_value_processors`); psycopg dumps the others as
    they are. On SQLite one ``executemany`` of the driver's cursor on the row tuples,
    each value converted as SQLAlchemy would (:func:`sqlite_executemany`). Columns
    left out take their server defaults. Elsewhere SQLAlchemy's executemany. Errors
    are SQLAlchemy's either way (the driver's are wrapped here): a dropped
    connection is an ``OperationalError`` that the worker retries, a refused row an
    ``IntegrityError``.
    """
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        table = model.__table__  # type: ignore[attr-defined]
        rows = converted(rows, driver_value_processors(table, columns, dialect))
        raw = connection.connection.driver_connection
        statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN"
        driver_error = dialect.loaded_dbapi.Error
        try:
            with raw.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[union-attr]
                for row in rows:
                    copy.write_row(row)
        except driver_error as exc:
            lost = dialect.is_disconnect(exc, raw, None)
            if lost:  # as SQLAlchemy does for its own statements: the pool drops it
                connection.invalidate(exc)
            raise DBAPIError.instance(statement, None, exc, driver_error, dialect=dialect,
                                      connection_invalidated=lost) from exc
        return
    if dialect.name == "sqlite":
        sqlite_executemany(connection, model.__table__, columns, rows)  # type: ignore[attr-defined]
        return
    connection.execute(insert(model), [dict(zip(columns, row, strict=True)) for row in rows])


def sqlite_executemany(connection: Connection, table: Table, columns: Sequence[str],
                       rows: Sequence[tuple[Any, ...]]) -> None:
    """``INSERT`` the row tuples with the sqlite3 cursor's ``executemany``, in the
    connection's transaction. Values go through each column type's SQLAlchemy bind
    processor (datetimes to SQLAlchemy's text format, enums to their names, JSON to
    text), so the rows read back as if SQLAlchemy had written them; what is skipped
    is SQLAlchemy's parameter dictionary per row and its per-row parameter work
    (and the Boolean conversion, which sqlite3 does the same way itself):
    2.7x the token rows per second (``python -m bench.throughput --sections ingest``:
    337,000-344,000 against 127,000-128,000 rows/s on 200,000 rows, 2026-11-27)."""
    dialect = connection.dialect
    rows = converted(rows, [sqlite_bind_processor(table.c[name].type, dialect)
                            for name in columns])
    statement = (f"INSERT INTO {table.name} ({', '.join(columns)}) "
                 f"VALUES ({', '.join('?' for _ in columns)})")
    driver_error = dialect.loaded_dbapi.Error
    cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(statement, rows)
    except driver_error as exc:
        raise DBAPIError.instance(statement, None, exc, driver_error,
                                  dialect=dialect) from exc
    finally:
        cursor.close()


def sqlite_bind_processor(column_type: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """SQLAlchemy's bind processor of ``column_type`` on SQLite, None where the sqlite3
    driver stores the Python value the same way itself: a Boolean column's ``True`` /
    ``False`` are the integers 1 / 0 either way (``bool`` is an ``int``), so token rows,
    one Boolean among plain columns, go to the driver untouched."""
    if isinstance(column_type, Boolean):
        return None
    return column_type.dialect_impl(dialect).bind_processor(dialect)
