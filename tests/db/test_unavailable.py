"""An unreachable database raises QueueUnavailable (callers answer DICOM 0xA700), fast."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from db.errors import QueueUnavailable
from db.migrate import upgrade
from db.queue import Queue, StudyState
from tests.conftest import free_port
from tests.db.conftest import add_instance, uid


def test_postgres_on_a_closed_port() -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/cxr"
    q = Queue.from_url(url, lease_seconds=60, max_attempts=3)
    t0 = time.monotonic()
    try:
        with pytest.raises(
            QueueUnavailable, match=r"127\.0\.0\.1.*unavailable.*queue\.database_url"
        ):
            add_instance(q, uid())
        with pytest.raises(QueueUnavailable):
            q.counts()
    finally:
        q.close()
    assert time.monotonic() - t0 < 10
    with pytest.raises(QueueUnavailable):
        upgrade(url)


def test_password_is_not_in_the_message() -> None:
    url = f"postgresql+psycopg://cxr:s3cret@127.0.0.1:{free_port()}/cxr"
    q = Queue.from_url(url, lease_seconds=60, max_attempts=3)
    try:
        with pytest.raises(QueueUnavailable) as e:
            q.claim("w")
        assert "s3cret" not in str(e.value)
    finally:
        q.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_sqlite_in_a_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(QueueUnavailable, match="cannot create the folder"):
            Queue.from_url(
                f"sqlite:///{ro / 'missing' / 'q.sqlite3'}", lease_seconds=60, max_attempts=3
            )
    finally:
        ro.chmod(0o700)


def test_sqlite_path_that_cannot_be_a_folder(tmp_path: Path) -> None:
    """Works as root too: a regular file where the database folder should be."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(QueueUnavailable, match="cannot create the folder"):
        Queue.from_url(f"sqlite:///{blocker / 'q.sqlite3'}", lease_seconds=60, max_attempts=3)


def test_sqlite_file_deleted_folder(tmp_path: Path) -> None:
    """The database folder disappears under a running queue: QueueUnavailable, not a crash."""
    folder = tmp_path / "db"
    url = f"sqlite:///{folder / 'q.sqlite3'}"
    upgrade(url)
    q = Queue.from_url(url, lease_seconds=60, max_attempts=3)
    try:
        q.close()  # no pooled connection keeps the deleted file alive
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
        with pytest.raises(QueueUnavailable, match="unavailable"):
            add_instance(q, uid())
    finally:
        q.close()


def test_sqlite_locked_past_busy_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import db.engine

    monkeypatch.setattr(db.engine, "SQLITE_BUSY_TIMEOUT_MS", 200)
    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    upgrade(url)
    holder = Queue.from_url(url, lease_seconds=60, max_attempts=3)
    q = Queue.from_url(url, lease_seconds=60, max_attempts=3)
    try:
        with holder.engine.begin():  # BEGIN IMMEDIATE: holds the write lock
            t0 = time.monotonic()
            with pytest.raises(QueueUnavailable, match="locked"):
                add_instance(q, uid())
            assert time.monotonic() - t0 < 5
            assert q.counts()[StudyState.RECEIVING] == 0, "readers are not blocked in WAL mode"
    finally:
        holder.close()
        q.close()
