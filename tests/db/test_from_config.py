"""Queue.from_config: the start-up checks (empty database migrated or refused, out of date
refused)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from db.config import QueueConfig
from db.engine import safe_url
from db.errors import DatabaseNotReady, QueueError
from db.migrate import current_revision, head_revision, is_empty, upgrade
from db.queue import Queue


def _cfg(url: str) -> QueueConfig:
    return QueueConfig(database_url=url, lease_seconds=60, heartbeat_seconds=10, max_attempts=4)


def test_empty_database_is_migrated_when_allowed(database_url: str) -> None:
    q = Queue.from_config(_cfg(database_url), upgrade_empty=True, delivery_max_attempts=7)
    try:
        assert current_revision(database_url) == head_revision()
        assert q.check_schema() == head_revision()
        assert q.lease == timedelta(seconds=60) and q.max_attempts == 4
        assert q.delivery_max_attempts == 7
        assert set(q.counts().values()) == {0}
    finally:
        q.close()


def test_empty_database_is_refused_by_default(database_url: str) -> None:
    with pytest.raises(DatabaseNotReady, match=r"has no schema: run 'cxr-worker db upgrade'"):
        Queue.from_config(_cfg(database_url))
    assert is_empty(database_url), "a refused start-up must not create the schema"


def test_out_of_date_database_is_refused_even_with_upgrade_empty(database_url: str) -> None:
    upgrade(database_url, "0001_initial")
    for upgrade_empty in (False, True):
        with pytest.raises(
            DatabaseNotReady,
            match=r"at revision 0001_initial, not the latest: run 'cxr-worker db upgrade' "
            r"\(back up first\)",
        ):
            Queue.from_config(_cfg(database_url), upgrade_empty=upgrade_empty)
    assert current_revision(database_url) == "0001_initial", "never migrated behind your back"


def test_migrated_database_opens(database_url: str) -> None:
    upgrade(database_url)
    q = Queue.from_config(_cfg(database_url))
    try:
        assert q.check_schema() == head_revision() and q.delivery_max_attempts == 5
    finally:
        q.close()


def test_sqlite_folder_is_created(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'var' / 'deep' / 'queue.sqlite3'}"
    Queue.from_config(_cfg(url), upgrade_empty=True).close()
    assert (tmp_path / "var" / "deep" / "queue.sqlite3").is_file()


def test_database_not_ready_is_a_runtime_error() -> None:
    assert issubclass(DatabaseNotReady, QueueError) and issubclass(DatabaseNotReady, RuntimeError)


def test_safe_url_hides_the_password() -> None:
    assert (
        safe_url("postgresql+psycopg://cxr:s3cret@db/cxr") == "postgresql+psycopg://cxr:***@db/cxr"
    )
    assert safe_url("sqlite:///var/queue.sqlite3") == "sqlite:///var/queue.sqlite3"
    assert safe_url("not a url at all") == "<unparseable database URL>"


def test_bad_policy_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    with pytest.raises(ValueError, match="delivery_max_attempts must be >= 1, got 0"):
        Queue.from_url(url, lease_seconds=60, max_attempts=3, delivery_max_attempts=0)
    with pytest.raises(ValueError, match="max_attempts must be >= 1, got 0"):
        Queue.from_url(url, lease_seconds=60, max_attempts=0)
