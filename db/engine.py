"""Engines for the queue: pool settings, SQLite pragmas, and database errors turned into
:class:`~db.errors.QueueUnavailable`.

SQLite notes. pysqlite's own transaction handling cannot do what a queue needs, so the driver is put
in autocommit mode and SQLAlchemy emits the ``BEGIN`` itself (the documented recipe). Writes use
``BEGIN IMMEDIATE``: the write lock is taken up front, so two writers queue on ``busy_timeout`` instead
of failing on a lock upgrade. Reads use a plain deferred ``BEGIN`` and, in WAL mode, never block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, make_url

from db.errors import QueueUnavailable

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 15_000
PG_CONNECT_TIMEOUT_S = 5

# PostgreSQL SQLSTATEs worth retrying inside the queue (deadlock, serialization failure).
_PG_RETRYABLE = {"40P01", "40001"}


def safe_url(url: str | URL) -> str:
    """The URL with its password hidden, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///PATH`` or ``postgresql+psycopg://...`` with the queue's settings."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return _sqlite_engine(u)
    if u.get_backend_name() == "postgresql":
        return sa.create_engine(
            u,
            pool_size=5,
            max_overflow=5,
            pool_timeout=10,
            pool_recycle=1800,
            pool_pre_ping=True,  # a restarted server must not hand us dead connections
            connect_args={
                "connect_timeout": PG_CONNECT_TIMEOUT_S,
                "application_name": "cxr-pacs-worker",
            },
        )
    raise ValueError(
        f"{safe_url(u)}: unsupported database; use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"
    )


def _sqlite_engine(u: URL) -> Engine:
    db = u.database or ""
    if db in ("", ":memory:") or db.startswith("file:"):
        raise ValueError(
            f"{safe_url(u)}: the queue needs an SQLite file (sqlite:///var/queue.sqlite3); "
            "in-memory databases are not shared between connections"
        )
    path = Path(db)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QueueUnavailable(
            f"cannot create the folder {str(path.parent)!r} for the SQLite queue {str(path)!r}: {e}; "
            "fix the path or its permissions (queue.database_url)"
        ) from e
    engine = sa.create_engine(
        u,
        pool_size=5,
        max_overflow=10,
        pool_timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = FULL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "DEFERRED" if conn.get_execution_options().get("cxr_readonly") else "IMMEDIATE"
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def is_retryable(e: BaseException) -> bool:
    """A PostgreSQL deadlock or serialization failure: the transaction may simply be run again."""
    orig = getattr(e, "orig", None)
    return getattr(orig, "sqlstate", None) in _PG_RETRYABLE


def unavailable(e: BaseException, url: str | URL) -> QueueUnavailable:
    """A :class:`QueueUnavailable` that says what failed, where, and what to do."""
    detail = (
        str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e) else type(e).__name__
    )
    return QueueUnavailable(
        f"study queue database {safe_url(url)} is unavailable: {detail}; "
        "check that the database is running and reachable (queue.database_url); callers may retry later"
    )


@contextmanager
def translate_errors(url: str | URL) -> Iterator[None]:
    """Turn connection-level failures into :class:`QueueUnavailable`; let other errors through."""
    try:
        yield
    except (
        exc.OperationalError,
        exc.InterfaceError,
        exc.TimeoutError,
        exc.DisconnectionError,
    ) as e:
        if is_retryable(e):
            raise
        raise unavailable(e, url) from e
    except exc.DBAPIError as e:
        if e.connection_invalidated:
            raise unavailable(e, url) from e
        raise


def lock_rows(
    conn: Connection, stmt: sa.Select[Any], *, skip_locked: bool = False
) -> sa.Select[Any]:
    """``FOR UPDATE [SKIP LOCKED]`` on PostgreSQL. SQLite has no row locks (SQLAlchemy would drop the
    clause anyway): there, ``BEGIN IMMEDIATE`` serialises writers and compare-and-set does the rest."""
    if conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=skip_locked)
    return stmt
