"""One search at a time per study: a lock that a second process searching the same study is refused by.

Two drivers on one study each count the trials they finished towards the target (two resumes to 6
trials left 10), and each takes the other's running trials for a crash's leftovers. The lock lives
where the study does: a file lock beside a SQLite database, a session advisory lock on PostgreSQL;
both go away with the process that holds them, however it ends. A PostgreSQL restart ends the
session and so the lock: a search that rides out the outage (the driver retries) runs on unlocked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy

from studies.store import StoreError

__all__ = ["StudyBusy", "study_lock"]


class StudyBusy(StoreError):
    """Another process is searching this study now."""


def _busy(study: str) -> StudyBusy:
    return StudyBusy(f"study {study!r} is being searched by another process now; wait for it to finish "
                     "(or stop it), then resume")


@contextlib.contextmanager
def study_lock(storage: str, study: str) -> Iterator[None]:
    """Holds ``study``'s lock in ``storage`` for the block; :class:`StudyBusy` at once if another process
    holds it. Storages without a lock of their own (SQLite in memory) are not locked."""
    url = sqlalchemy.make_url(storage)
    digest = hashlib.sha256(study.encode()).digest()
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        db = Path(url.database)
        folder = db.with_name(db.name + ".locks")
        folder.mkdir(exist_ok=True)
        with open(folder / f"{digest.hex()[:24]}.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _busy(study) from None
            yield  # closing the file releases the lock
        return
    if url.get_backend_name() == "postgresql":
        key = int.from_bytes(digest[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                if not conn.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                    raise _busy(study)
                try:
                    yield
                finally:
                    try:
                        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    except sqlalchemy.exc.DBAPIError:
                        pass  # the session died (a database restart): its lock went with it
        finally:
            engine.dispose()
        return
    yield
