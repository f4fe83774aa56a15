"""Bringing a database written by an older TurboQuant up to today's tables, when it is opened.

Two steps. Columns added since (``ADDED_COLUMNS``, nullable: ``kv_bytes``) are added to an older
table, on every database (``ALTER TABLE ... ADD COLUMN``, its rows getting NULL). And the byte and
weight counts (``WIDE_COLUMNS``) were 32-bit ``INTEGER`` columns,
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
from sqlalchemy.exc import DBAPIError

from studies.models import ADDED_COLUMNS, WIDE_COLUMNS

__all__ = ["missing_columns", "narrow_columns", "migrate"]


def missing_columns(engine: Engine) -> list[tuple[str, str, str]]:
    """(table, column, its SQL type) of the added columns that ``engine``'s existing tables lack."""
    inspector = inspect(engine)
    existing = set(inspector.get_table_names())
    out = []
    for table, columns in ADDED_COLUMNS:
        if table.name in existing:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            out += [(table.name, c, table.c[c].type.compile(engine.dialect)) for c in columns if c not in have]
    return out

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
    """Adds the missing columns and widens the old 32-bit byte columns in place (PostgreSQL); see the
    module docstring."""
    for table, column, sql_type in missing_columns(engine):
        log.info("adding column %s.%s", table, column)
        try:
            with engine.begin() as conn:
                conn.execute(text(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {sql_type}'))
        except DBAPIError:  # another process added it a moment ago: fine if it is there now
            if (table, column, sql_type) in missing_columns(engine):
                raise
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
