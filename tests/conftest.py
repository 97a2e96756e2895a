"""Fixtures shared by every test layer.

- ``tests/data/`` holds the real DICOM files the core tests use (see tests/data/README.md).
- ``shared_data`` points at ``../shared/data`` when it exists; tests that need it are skipped with a
  visible reason elsewhere.
- ``database_url`` is parametrised over SQLite and the real PostgreSQL at 127.0.0.1:5432 (a fresh
  database per test, dropped afterwards); ``sqlite_queue`` and ``any_queue`` are the real queue on
  them (db is imported only when a test asks for one).
- ``start_scp`` starts the storage SCP on a free loopback port, recording into an in-memory sink
  (:class:`tests.fakes.MemorySink`) unless a test passes the real queue.

Nothing here imports db or worker at import time: the DICOM unit tests run without them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.sink import InstanceSink
from tests.dicom_net import RunningSCP, scp_starter
from tests.dicom_net import free_port as free_port  # re-exported: test folders import it here
from tests.fakes import MemorySink

if TYPE_CHECKING:
    from db.queue import Queue

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
            "../shared/data not present (set CXR_SHARED_DATA): "
            "this test needs the research data there"
        )
    return d


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


# --- real DICOM instances and the storage SCP ----------------------------------------------------


@pytest.fixture(scope="session")
def rg1_ds() -> Dataset:
    return pydicom.dcmread(DATA / "RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def sc_ds() -> Dataset:
    """The 127 kB Secondary Capture chest X-ray: the cheapest real instance to send."""
    return pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")


@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[Callable[..., RunningSCP]]:
    """``start_scp(queue=None, *, sink=None, **config overrides)`` starts a StorageSCP storing
    under ``tmp_path/storage``; it records into ``sink``, else into the real ``queue`` (through
    worker's QueueSink), else into a new :class:`MemorySink`. Every one is stopped at teardown."""
    with scp_starter(tmp_path / "storage") as start:

        def start_with(
            queue: Queue | None = None, *, sink: InstanceSink | None = None, **overrides: Any
        ) -> RunningSCP:
            if sink is None and queue is not None:
                from worker.ingest import QueueSink  # noqa: PLC0415 - only the queue tests need it

                sink = QueueSink(queue)
            return start(sink if sink is not None else MemorySink(), **overrides)

        yield start_with


# --- the real queue (imported only by the tests that use it) ------------------------------------


def open_queue(url: str) -> Queue:
    """Migrate ``url`` and open the real queue on it."""
    from db.migrate import upgrade  # noqa: PLC0415
    from db.queue import Queue  # noqa: PLC0415

    upgrade(url)
    return Queue.from_url(url, lease_seconds=60, max_attempts=3)


@pytest.fixture
def sqlite_queue(tmp_path: Path) -> Iterator[Queue]:
    q = open_queue(f"sqlite:///{tmp_path / 'queue.sqlite3'}")
    yield q
    q.close()


@pytest.fixture
def any_queue(database_url: str) -> Iterator[Queue]:
    """The real queue on SQLite and on PostgreSQL (the test runs once per database)."""
    q = open_queue(database_url)
    yield q
    q.close()
