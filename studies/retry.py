"""Riding out a database that is briefly unreachable (a PostgreSQL restart, a locked SQLite file)."""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

__all__ = ["with_db_retry", "DB_ERRORS", "SCHEMA_RACE_SECONDS"]

log = logging.getLogger(__name__)
T = TypeVar("T")
DB_ERRORS: tuple[type[BaseException], ...] = (OperationalError, DBAPIError)
# Creating a schema that another process is creating at the same moment fails once and then
# finds it made; a few short retries ride that out without making a bad URL slow to report.
SCHEMA_RACE_SECONDS = 3.0


def with_db_retry(fn: Callable[[], T], what: str, *, retry_on: tuple[type[BaseException], ...] = DB_ERRORS,
                  timeout: float = 300.0, first_wait: float = 0.5) -> T:
    """Calls ``fn``; on a database error waits (doubling, up to 10 s) and calls again until ``timeout``.

    The result being written is held by the caller meanwhile, so nothing is dropped; after
    ``timeout`` the last error propagates and the caller's crash-safety (resume) takes over.
    """
    deadline = time.monotonic() + timeout
    wait = first_wait
    while True:
        try:
            return fn()
        except retry_on as exc:
            if time.monotonic() + wait > deadline:
                raise
            log.warning("database unavailable while %s (%s); retrying in %.1f s",
                        what, str(exc).strip().splitlines()[0][:120], wait)
            time.sleep(wait)
            wait = min(wait * 2, 10.0)
