"""Bringing a database written by an older TurboQuant up to today's tables, when it is opened.

One step so far: the byte and weight counts (``WIDE_COLUMNS``) were 32-bit ``INTEGER`` columns,
which overflow past 2 GB (a 7B model's bytes do); they are now ``BIGINT``. The step reads the
column types (SQLAlchemy's inspector) and widens only what is still narrow, so it is idempotent
and costs one catalogue query on an up-to-date database. No version table of our own is needed
(Optuna's tables use the default ``alembic_version``; ours must not touch it).

- PostgreSQL: ``ALTER TABLE ... ALTER COLUMN ... TYPE BIGINT`` (the rows are kept; indexes on the
  column are rebuilt by PostgreSQL).
- SQLite: nothing to do. Its ``INTEGER`` columns store any 64-bit integer (type affinity, not a
  width), so an old file already holds large counts exactly (``tests/test_store.py`` checks it).
"""

from __future__ import annotations

import logging

from sqlalchemy import BigInteger, inspect, text
from sqlalchemy.engine import Engine

from studies.models import WIDE_COLUMNS

__all__ = ["narrow_columns", "migrate"]

log = logging.getLogger(__name__)


def narrow_columns(engine: Engine) -> list[tuple[str, str]]:
    """(table, column) of the byte counts still narrower than 64 bits in ``engine``'s database."""
    inspector = inspect(engine)
    existing = set(inspector.get_table_names())
    narrow = []
    for table, columns in WIDE_COLUMNS:
        if table.name not in existing:
            continue
        types = {c["name"]: c["type"] for c in inspector.get_columns(table.name)}
        narrow += [(table.name, c) for c in columns if c in types and not isinstance(types[c], BigInteger)]
    return narrow


def migrate(engine: Engine) -> None:
    """Widens the old 32-bit byte columns in place (PostgreSQL); see the module docstring."""
    if engine.dialect.name != "postgresql":
        return  # SQLite: INTEGER is already 64-bit; other databases get today's tables when created
    narrow = narrow_columns(engine)
    if not narrow:
        return
    log.info("widening %d byte column(s) to 64 bits: %s", len(narrow), ", ".join(f"{t}.{c}" for t, c in narrow))
    with engine.begin() as conn:
        for table, column in narrow:
            # Widening a column that another process has just widened is a no-op, so a race is harmless.
            conn.execute(text(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE BIGINT'))
