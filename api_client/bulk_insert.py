"""Many rows into one table in few statements: PostgreSQL ``COPY`` (psycopg 3), SQLite
``INSERT`` statements of many rows each, else SQLAlchemy's executemany. Used for job
rows at submit and for result rows in the worker."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
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
    they are. On SQLite ``INSERT`` statements of many rows each, each value converted
    as SQLAlchemy would (:func:`sqlite_insert_rows`). Columns left out take their
    server defaults. Elsewhere SQLAlchemy's executemany. Errors
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
        sqlite_insert_rows(connection, model.__table__, columns, rows)  # type: ignore[attr-defined]
        return
    connection.execute(insert(model), [dict(zip(columns, row, strict=True)) for row in rows])


#: Most rows in one SQLite ``INSERT`` (a power of two; see :func:`sqlite_insert_rows`).
SQLITE_MAX_ROWS = 1024


def sqlite_insert_rows(connection: Connection, table: Table, columns: Sequence[str],
                       rows: Sequence[tuple[Any, ...]]) -> None:
    """``INSERT`` the row tuples in the connection's transaction, in statements of many
    rows each (``VALUES (?, ...), (?, ...), ...``). Values go through each column
    type's SQLAlchemy bind processor (datetimes to SQLAlchemy's text format, enums to
    their names, JSON to text), so the rows read back as if SQLAlchemy had written
    them; what is skipped is SQLAlchemy's parameter dictionary per row and its
    per-row parameter work (and the Boolean conversion, which sqlite3 does the same
    way itself).

    Statements of many rows, not the driver's ``executemany``: sqlite3 releases the
    GIL for every statement it runs, one per row in an executemany, and a thread
    that gives the GIL up waits up to the interpreter's switch interval (5 ms) to get
    it back while another thread runs Python, as the worker's store thread does
    beside the thread queuing the next batch. 2,880 token rows took 15.6 s as an
    executemany next to a thread running Python (13-16 ms alone).

    The statements have :data:`SQLITE_MAX_ROWS` rows, or fewer where SQLite's limit
    on bound values says so, and the rest goes in statements of halving powers of
    two: sqlite3 keeps each distinct statement it prepared (128 of them; a
    statement of 2,000-4,600 rows holds ~2 MiB), so there are at most a dozen
    distinct statements per table, whatever the row counts."""
    dialect = connection.dialect
    rows = converted(rows, [sqlite_bind_processor(table.c[name].type, dialect)
                            for name in columns])
    raw = connection.connection.driver_connection
    head = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "
    one_row = f"({', '.join('?' for _ in columns)})"
    driver_error = dialect.loaded_dbapi.Error
    cursor = raw.cursor()  # type: ignore[union-attr]
    statement = head
    try:
        for count, values in sqlite_statement_values(raw, rows):
            statement = head + ", ".join([one_row] * count)
            cursor.execute(statement, values)
    except driver_error as exc:
        raise DBAPIError.instance(statement[:500], None, exc, driver_error,
                                  dialect=dialect) from exc
    finally:
        cursor.close()


def sqlite_statement_values(raw_connection: Any, rows: Sequence[tuple[Any, ...]]
                            ) -> Iterator[tuple[int, list[Any]]]:
    """Per statement of many rows: how many rows, and their values in order, flat
    (:func:`statement_sizes` under the connection's limit on bound values)."""
    width = len(rows[0]) if rows else 1
    start = 0
    for count in statement_sizes(len(rows), sqlite_max_values(raw_connection) // width):
        yield count, [value for row in rows[start:start + count] for value in row]
        start += count


def statement_sizes(total: int, most: int) -> list[int]:
    """Rows per statement for ``total`` rows: the largest power of two up to
    :data:`SQLITE_MAX_ROWS` and ``most`` as often as it fits, then the rest's binary
    digits, largest first (1,000 rows under a limit of 256: 256, 256, 256, 128, 64,
    32, 8)."""
    size = 1
    while size * 2 <= min(SQLITE_MAX_ROWS, max(1, most)):
        size *= 2
    sizes = [size] * (total // size)
    rest = total % size
    while size > 1:
        size //= 2
        if rest & size:
            sizes.append(size)
    return sizes


def sqlite_max_values(raw_connection: Any) -> int:
    """How many values one statement may bind on this sqlite3 connection: its limit
    where Python can read it (3.11+), else SQLite's default for its version (999
    before 3.32, then 32,766)."""
    getlimit = getattr(raw_connection, "getlimit", None)
    if getlimit is not None:
        return int(getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    return 32_766 if sqlite3.sqlite_version_info >= (3, 32) else 999


def sqlite_bind_processor(column_type: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """SQLAlchemy's bind processor of ``column_type`` on SQLite, None where the sqlite3
    driver stores the Python value the same way itself: a Boolean column's ``True`` /
    ``False`` are the integers 1 / 0 either way (``bool`` is an ``int``), so token rows,
    one Boolean among plain columns, go to the driver untouched."""
    if isinstance(column_type, Boolean):
        return None
    return column_type.dialect_impl(dialect).bind_processor(dialect)
