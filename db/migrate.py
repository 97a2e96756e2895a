"""Schema migrations, run programmatically: ``upgrade(url)``, ``current_revision(url)``,
``is_empty(url)``, ``ensure_ready(url, upgrade_empty=...)``.

The Alembic scripts live in ``db/migrations`` (package data); no ``alembic.ini`` is needed in the
working directory. ``cxr-worker db upgrade`` calls :func:`upgrade`; ``serve`` opens the queue with
:meth:`db.queue.Queue.from_config`, which migrates a database that has no tables yet.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from db.engine import make_engine, safe_url, translate_errors
from db.errors import DatabaseNotReady

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Alembic keeps its running environment in module globals (alembic.context, alembic.op): two threads
# migrating at once would mix them up. Processes are serialised by a database lock (see env.py).
_ALEMBIC_LOCK = threading.Lock()


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise RuntimeError(f"no Alembic revisions found in {MIGRATIONS_DIR}")
    return head


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: newest). Safe to repeat, and safe
    to run from several processes at once (serialised by a lock on both backends)."""
    cfg = _config()
    engine = make_engine(url)
    try:
        with _ALEMBIC_LOCK, translate_errors(url), engine.connect() as conn:
            cfg.attributes["connection"] = conn
            before = _current(conn)
            command.upgrade(cfg, revision)
            conn.commit()
            after = _current(conn)
        if before != after:
            log.info("database %s upgraded from %s to %s", safe_url(url), before or "empty", after)
        else:
            log.debug("database %s already at %s", safe_url(url), after)
    finally:
        engine.dispose()


def _current(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def current_revision(url: str) -> str | None:
    """The revision the database is at, or ``None`` if it was never migrated."""
    engine = make_engine(url)
    try:
        with translate_errors(url), engine.connect() as conn:
            conn = conn.execution_options(cxr_readonly=True)
            return _current(conn)
    finally:
        engine.dispose()


def is_empty(url: str) -> bool:
    """True when the database has no tables at all (a new database ``serve`` may initialise)."""
    engine = make_engine(url)
    try:
        with translate_errors(url), engine.connect() as conn:
            conn = conn.execution_options(cxr_readonly=True)
            return not sa.inspect(conn).get_table_names()
    finally:
        engine.dispose()


def ensure_ready(url: str, *, upgrade_empty: bool) -> str:
    """The database's revision once it is the newest: an empty database is migrated when
    ``upgrade_empty``, else :class:`DatabaseNotReady`; an out-of-date one is refused (migrating
    it is a person's decision: back up first). The SQLite folder is created if missing."""
    if is_empty(url):
        if not upgrade_empty:
            raise DatabaseNotReady(
                f"database {safe_url(url)} has no schema: run 'cxr-worker db upgrade'"
            )
        log.info("empty database: creating the schema")
        upgrade(url)
        return head_revision()
    have = current_revision(url)
    if have != head_revision():
        raise DatabaseNotReady(
            f"database {safe_url(url)} is at revision {have}, not the latest: "
            "run 'cxr-worker db upgrade' (back up first)"
        )
    return have
