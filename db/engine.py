"""Engines for the queue: pool settings, SQLite pragmas, and database errors turned into
:class:`~db.errors.QueueUnavailable`.

SQLite notes. pysqlite's own transaction handling cannot do what a queue needs, so the driver is
put in autocommit mode and SQLAlchemy emits the ``BEGIN`` itself (the documented recipe). Writes
use ``BEGIN IMMEDIATE``: the write lock is taken up front, so two writers queue on
``busy_timeout`` instead of failing on a lock upgrade. Reads use a plain deferred ``BEGIN`` and,
in WAL mode, never block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url

from db.errors import QueueUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 15_000
PG_CONNECT_TIMEOUT_S = 5

# PostgreSQL SQLSTATEs worth retrying inside the queue (deadlock, serialization failure).
_PG_RETRYABLE = {"40P01", "40001"}


def safe_url(url: str | URL) -> str:
    """The URL with its password hidden, for messages and logs (the one place that hides it)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (exc.ArgumentError, ValueError):
        return "<unparseable database URL>"


#: PostgreSQL URL schemes that mean the driver this package installs (psycopg 3).
_PG_PLAIN = ("postgresql://", "postgres://")
_PG_DRIVER = "postgresql+psycopg://"


def normalise_database_url(url: str) -> str:
    """The URL the queue opens: ``postgresql://`` and ``postgres://`` (no driver named) become
    ``postgresql+psycopg://``, the driver this package installs; another PostgreSQL driver is
    refused with the fix named; SQLite URLs pass as they are. ValueError for anything else (the
    message never repeats a password)."""
    v = url.strip()
    for plain in _PG_PLAIN:
        if v.startswith(plain):
            return _PG_DRIVER + v[len(plain) :]
    if v.startswith("postgresql+psycopg://") or v.startswith("sqlite:"):
        return v
    shown = safe_url(v) if "://" in v else v[:40]
    if v.startswith("postgres"):
        scheme = v.split("://", 1)[0]
        raise ValueError(
            f"{shown!r}: the driver in {scheme!r} is not installed; "
            "use postgresql+psycopg://USER@HOST/DB (psycopg 3)"
        )
    raise ValueError(
        f"{shown!r} is not a supported database URL (sqlite:///PATH or "
        "postgresql+psycopg://USER@HOST/DB)"
    )


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///PATH`` or ``postgresql+psycopg://...`` (``postgresql://`` is
    read as the latter, see :func:`normalise_database_url`), queue settings."""
    u = make_url(normalise_database_url(url) if url.startswith("postgres") else url)
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
            f"cannot create the folder {str(path.parent)!r} for the SQLite queue "
            f"{str(path)!r}: {e}; "
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
        "check that the database is running and reachable (queue.database_url); "
        "callers may retry later"
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
    """``FOR UPDATE [SKIP LOCKED]`` on PostgreSQL. SQLite has no row locks (SQLAlchemy would drop
    the clause anyway): there, ``BEGIN IMMEDIATE`` serialises writers and compare-and-set does the
    rest."""
    if conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=skip_locked)
    return stmt


def due_by(column: sa.ColumnElement[Any], at: Any) -> sa.ColumnElement[bool]:
    """``column`` is unset or not later than ``at`` (a row whose time has come)."""
    return sa.or_(column.is_(None), column <= at)


def locked_ids(conn: Connection, stmt: sa.Select[Any]) -> list[int]:
    """The ids ``stmt`` selects, locked ``FOR UPDATE SKIP LOCKED`` on PostgreSQL: rows another
    transaction is working on are passed over, not waited for."""
    return list(conn.execute(lock_rows(conn, stmt, skip_locked=True)).scalars().all())


def insert_or_skip(conn: Connection, table: sa.Table) -> Any:
    """A dialect INSERT that supports ``on_conflict_do_nothing`` (PostgreSQL and SQLite)."""
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


class Conflict(Exception):
    """A concurrent change won (row vanished, compare-and-set missed): run the transaction again."""


class Database:
    """One engine plus the queue's transaction discipline: every write in one transaction,
    retried on deadlock, serialization failure and :class:`Conflict`; connection failures become
    :class:`QueueUnavailable`. Thread-safe (pooled connections)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.url = engine.url

    def write(self, fn: Callable[[Connection], T], *, tries: int = 3) -> T:
        """Run ``fn`` in one write transaction (``BEGIN IMMEDIATE`` on SQLite)."""
        for attempt in range(1, tries + 1):
            try:
                with translate_errors(self.url), self.engine.begin() as conn:
                    return fn(conn)
            except (exc.OperationalError, Conflict) as e:
                if isinstance(e, exc.OperationalError) and not is_retryable(e):
                    raise unavailable(e, self.url) from e
                if attempt == tries:
                    raise self._gave_up(e, tries) from e
                log.debug("transaction conflict (%s), retrying (%d/%d)", e, attempt, tries)
        raise AssertionError("unreachable")

    def _gave_up(self, e: Exception, tries: int) -> QueueUnavailable:
        if isinstance(e, Conflict):
            return QueueUnavailable(
                f"study queue {safe_url(self.url)}: {e}; gave up after {tries} tries, retry later"
            )
        return unavailable(e, self.url)

    def read(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in a read transaction (deferred on SQLite: never blocks in WAL mode)."""
        with translate_errors(self.url), self.engine.connect() as conn:
            conn = conn.execution_options(cxr_readonly=True)
            with conn.begin():
                return fn(conn)
