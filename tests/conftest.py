"""Fixtures shared by every test layer.

- ``tests/data/`` holds the real DICOM files the core tests use (see tests/data/README.md).
- ``shared_data`` points at ``../shared/data`` when it exists; tests that need it are skipped with a
  visible reason elsewhere.
- ``database_url`` is parametrised over SQLite and the real PostgreSQL at 127.0.0.1:5432 (a fresh
  database per test, dropped afterwards).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DATA = TESTS / "data"
REPO = TESTS.parent
PG_ADMIN_URL = os.environ.get(
    "CXR_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _shared_data_dir() -> Path | None:
    env = os.environ.get("CXR_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or $CXR_SHARED_DATA); skips the test with a reason when absent."""
    d = _shared_data_dir()
    if d is None:
        pytest.skip(
            "../shared/data not present (set CXR_SHARED_DATA): this test needs the research data there"
        )
    return d


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


def _pg_available() -> bool:
    try:
        import sqlalchemy as sa

        eng = sa.create_engine(PG_ADMIN_URL)
        with eng.connect() as c:
            c.execute(sa.text("select 1"))
        eng.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable; CI must have it")
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is not reachable")
    return PG_ADMIN_URL


def make_pg_database(admin_url: str) -> tuple[str, str]:
    """Create a fresh database; return (its URL, its name)."""
    import sqlalchemy as sa

    name = f"cxr_test_{uuid.uuid4().hex[:12]}"
    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    eng.dispose()
    return admin_url.rsplit("/", 1)[0] + "/" + name, name


def drop_pg_database(admin_url: str, name: str) -> None:
    import sqlalchemy as sa

    eng = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'queue.sqlite3'}"
        return
    admin = request.getfixturevalue("pg_admin_url")
    url, name = make_pg_database(admin)
    try:
        yield url
    finally:
        drop_pg_database(admin, name)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[object]:
    """dcmtk's storescp on a free loopback port, as a PACS that receives our reports."""
    from tests.service import StoreSCP

    scp = StoreSCP(tmp_path / "pacs-received", free_port(), "PACS_SIM").start()
    try:
        yield scp
    finally:
        scp.stop()
