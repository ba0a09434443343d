"""Retrying a database write while the database is briefly unreachable.

A job's result is written once, at its end; a network blip or a database restart
at that moment must delay the write, not lose the result. Each try opens a fresh
session (``pool_pre_ping`` replaces dead connections).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Give up after the database was unreachable this long (seconds).
DEFAULT_RETRY_SECONDS = 600.0


class DatabaseUnavailable(Exception):
    """The database stayed unreachable for longer than the retry window."""


def retry_seconds() -> float:
    return float(os.environ.get("LOGPROBE_DB_RETRY_SECONDS", DEFAULT_RETRY_SECONDS))


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def with_db_retry(action: Callable[[], T], what: str, *, window: float | None = None) -> T:
    """Run ``action`` until it succeeds, retrying connection errors with backoff."""
    window = retry_seconds() if window is None else window
    deadline = time.monotonic() + window
    delay = 0.25
    attempt = 1
    while True:
        try:
            return action()
        except DBAPIError as exc:
            if not _transient(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise DatabaseUnavailable(
                    f"the database was unreachable for {window:g} s while trying to {what}: "
                    f"{exc.orig}"
                ) from exc
            log.warning("database unreachable (try %d) while trying to %s: %s; retrying in "
                        "%.1f s", attempt, what, str(exc.orig).strip(), delay)
            time.sleep(delay)
            attempt += 1
            delay = min(delay * 2, 5.0)
