"""Talk DICOM to the storage SCP under test: start it on a free loopback port, send real files
with pynetdicom (decoded, or raw bytes exactly as in the file), echo, and copy instances with
fresh UIDs. Used by tests/dicom_node (in-memory sink), tests/integration and tests/e2e (real queue).
"""

from __future__ import annotations

import copy
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from dicom_node.config import DicomNodeConfig
from dicom_node.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, StorageSCP
from dicom_node.sink import InstanceSink

SCP_AET = "CXR_TEST"
SCU_AET = "TEST_SCU"
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RunningSCP:
    scp: StorageSCP
    sink: InstanceSink
    storage: Path
    port: int

    def files(self) -> list[Path]:
        return sorted(p for p in self.storage.rglob("*") if p.is_file())


@contextmanager
def scp_starter(storage_dir: Path) -> Iterator[Callable[..., RunningSCP]]:
    """``start(sink, **config overrides)`` starts a StorageSCP storing under ``storage_dir``;
    every SCP started is stopped when the context ends."""
    started: list[StorageSCP] = []

    def start(sink: InstanceSink, **overrides: Any) -> RunningSCP:
        values: dict[str, Any] = {
            "ae_title": SCP_AET,
            "port": free_port(),
            "storage_dir": storage_dir,
            "min_free_disk_mb": 1,
        }
        values.update(overrides)
        cfg = DicomNodeConfig(**values)
        scp = StorageSCP(cfg, sink)
        scp.start()
        started.append(scp)
        return RunningSCP(scp, sink, Path(cfg.storage_dir), int(cfg.port))

    try:
        yield start
    finally:
        for scp in started:
            scp.stop(grace_s=2)


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


def body_bytes(path: Path) -> bytes:
    """The dataset bytes of a DICOM file, after its preamble and file meta."""
    from pydicom.filereader import _read_file_meta_info, read_preamble  # noqa: PLC0415

    with open(path, "rb") as f:
        read_preamble(f, False)
        _read_file_meta_info(f)
        return f.read()


needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="dcmtk (storescu/echoscu) not installed"
)
