"""Alembic environment, used programmatically through :mod:`db.migrate` (no alembic.ini needed).

The connection comes from ``config.attributes["connection"]`` (set by :func:`db.migrate.upgrade`),
so SQLite gets the queue's pragmas and ``BEGIN IMMEDIATE``. On PostgreSQL a transaction-scoped
advisory lock serialises concurrent upgrades (several workers starting at once).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from db.schema import Base

MIGRATION_LOCK_KEY = 0x63787271  # "cxrq": arbitrary, fixed

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through db.migrate.upgrade(url), not the alembic CLI")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
        compare_type=True,
        # SQLite DDL is transactional too: schema and version stamp commit together.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY}
            )
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError(
        "offline (SQL script) migrations are not supported; use db.migrate.upgrade(url)"
    )
run_migrations_online()
