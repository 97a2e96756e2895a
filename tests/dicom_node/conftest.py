"""Fixtures for the DICOM node tests: a real storage SCP on a free loopback port, backed by the
real study queue (SQLite, or SQLite and PostgreSQL where a test asks for ``pg_or_sqlite_queue``),
and helpers that send real files with pynetdicom (decoded, or raw bytes exactly as in the file).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from db.migrate import upgrade
from db.queue import Queue
from dicom_node.config import DicomNodeConfig
from dicom_node.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, StorageSCP
from tests.conftest import DATA, free_port
from worker.ingest import QueueSink

SCP_AET = "CXR_TEST"
SCU_AET = "TEST_SCU"
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def open_queue(url: str) -> Queue:
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


@dataclass
class RunningSCP:
    scp: StorageSCP
    queue: Queue | None
    storage: Path
    port: int

    def files(self) -> list[Path]:
        return sorted(p for p in self.storage.rglob("*") if p.is_file())


@pytest.fixture
def start_scp(tmp_path: Path) -> Iterator[Callable[..., RunningSCP]]:
    """``start_scp(queue, **config overrides)`` starts a StorageSCP; every one is stopped at teardown."""
    started: list[StorageSCP] = []

    def start(queue: Queue | None = None, *, sink: Any = None, **overrides: Any) -> RunningSCP:
        port = free_port()
        values: dict[str, Any] = {
            "ae_title": SCP_AET,
            "port": port,
            "storage_dir": tmp_path / "storage",
            "min_free_disk_mb": 1,
        }
        values.update(overrides)
        cfg = DicomNodeConfig(**values)
        scp = StorageSCP(cfg, sink if sink is not None else QueueSink(queue))  # type: ignore[arg-type]
        scp.start()
        started.append(scp)
        return RunningSCP(scp, queue, Path(cfg.storage_dir), int(cfg.port))

    yield start
    for scp in started:
        scp.stop(grace_s=2)


@pytest.fixture
def scp(start_scp: Callable[..., RunningSCP], sqlite_queue: Queue) -> RunningSCP:
    return start_scp(sqlite_queue)


def scu_ae(*, transfer_syntaxes: list[str] | None = None) -> AE:
    ae = AE(ae_title=SCU_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ts = transfer_syntaxes or list(TRANSFER_SYNTAXES)
    for sop_class in STORAGE_SOP_CLASSES:
        # one context per (SOP class, transfer syntax) so each file goes in its own syntax
        for t in ts:
            ae.add_requested_context(sop_class, t)
    return ae


def _associate(port: int, called: str = SCP_AET, calling: str = SCU_AET) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    return ae.associate("127.0.0.1", port, ae_title=called)


def send(port: int, *items: Dataset | Path, raw: bool = False) -> list[int]:
    """C-STORE each item on one association; return the statuses (-1: no response).

    ``raw=True`` sends each file's bytes after its file meta exactly as they are on disk
    (pynetdicom's chunked send), so malformed files reach the SCP unchanged.
    """
    ae = AE(ae_title=SCU_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for item in items:
        ts = (
            item.file_meta.TransferSyntaxUID
            if isinstance(item, Dataset)
            else pydicom.dcmread(item, stop_before_pixels=True).file_meta.TransferSyntaxUID
        )
        sop_class = (
            item.SOPClassUID
            if isinstance(item, Dataset)
            else pydicom.dcmread(item, stop_before_pixels=True).file_meta.MediaStorageSOPClassUID
        )
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=SCP_AET)
    assert assoc.is_established, f"association to 127.0.0.1:{port} was not established"
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = raw
    try:
        statuses = []
        for item in items:
            rsp = assoc.send_c_store(item if isinstance(item, Dataset) else str(item))
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
            # pynetdicom's requestor races its own reactor thread for a response that arrives
            # within a millisecond of the next request (it then logs "Received unexpected C-STORE
            # service message" and times out): give the reactor time to park between requests.
            time.sleep(0.02)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return statuses


def echo(port: int, called: str = SCP_AET) -> int:
    assoc = _associate(port, called=called)
    assert assoc.is_established, f"no association with {called} at 127.0.0.1:{port}"
    try:
        rsp = assoc.send_c_echo()
        return int(rsp.Status)
    finally:
        assoc.release()


def fresh(ds: Dataset, *, study: str | None = None) -> Dataset:
    """A copy of ``ds`` with new Study/Series/SOP Instance UIDs (and matching file meta)."""
    out = copy.deepcopy(ds)
    out.StudyInstanceUID = study or generate_uid(UID_ROOT)
    out.SeriesInstanceUID = generate_uid(UID_ROOT)
    out.SOPInstanceUID = generate_uid(UID_ROOT)
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def rg1_ds() -> Dataset:
    return pydicom.dcmread(DATA / "RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def sc_ds() -> Dataset:
    """The 127 kB Secondary Capture chest X-ray: the cheapest real instance to send."""
    return pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")


def body_bytes(path: Path) -> bytes:
    """The dataset bytes of a DICOM file, after its preamble and file meta."""
    from pydicom.filereader import _read_file_meta_info, read_preamble  # noqa: PLC0415

    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()
