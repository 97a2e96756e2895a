"""Crash test: ``kill -9`` the serving process while a client sends 50 instances.

After a restart, every instance that was acknowledged (0x0000) is on disk, parses, and has its
row in the database; no instance is there twice; every row has its file. Then the client resends
everything (what a PACS does for unacknowledged instances) and ends with exactly 50, each once.
"""

from __future__ import annotations

import copy
import importlib.util
import threading
import time
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from tests.conftest import DATA, free_port
from tests.dicom_net import UID_ROOT
from tests.service import ServiceProcess

pytestmark = [
    pytest.mark.network,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("worker.cli") is None,
        reason="worker.cli (cxr-worker serve) is not there yet",
    ),
]

AET = "CXR_CRASH"
N = 50
PER_STUDY = 5
KILL_AFTER = 20  # acknowledged instances before kill -9


def _instances() -> list[Dataset]:
    base = pydicom.dcmread(DATA / "RG1_UNCR.dcm")
    out = []
    for i in range(N):
        if i % PER_STUDY == 0:
            study = generate_uid(UID_ROOT)
            series = generate_uid(UID_ROOT)
        ds = Dataset()
        for elem in base:  # each element copied, the 7 MB pixel bytes shared (immutable)
            ds.add(copy.copy(elem))
        ds.file_meta = copy.deepcopy(base.file_meta)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(UID_ROOT)
        out.append(ds)
    return out


def _send_all(port: int, items: list[Dataset], acked: list[str], stop_on_failure: bool) -> None:
    """One association; append the SOP Instance UID of every 0x0000 answer to ``acked``."""
    ae = AE(ae_title="CRASH_SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(items[0].SOPClassUID, items[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    if not assoc.is_established:
        return
    try:
        for ds in items:
            try:
                rsp = assoc.send_c_store(ds)
            except Exception:  # the server died under us
                return
            status = rsp.get("Status") if rsp else None
            if status == 0x0000:
                acked.append(str(ds.SOPInstanceUID))
            elif stop_on_failure or not assoc.is_established:
                return
            time.sleep(0.02)  # see tests/dicom_net.py:send
    finally:
        if assoc.is_established:
            assoc.release()


def _rows(db: Path) -> list[tuple[str, str]]:
    eng = sa.create_engine(f"sqlite:///{db}")
    try:
        with eng.connect() as c:
            return [
                tuple(r)
                for r in c.execute(sa.text("select sop_instance_uid, rel_path from instances"))
            ]  # type: ignore[misc]
    finally:
        eng.dispose()


def _check_consistent(storage: Path, db: Path, acked: list[str]) -> dict[str, str]:
    rows = _rows(db)
    by_uid = dict(rows)
    assert len(by_uid) == len(rows), "an instance has two rows"
    for uid in acked:
        assert uid in by_uid, f"acknowledged instance {uid} has no row after the crash"
    for uid, rel in by_uid.items():  # every row has its complete file (file first, row second)
        ds = pydicom.dcmread(storage / rel)
        assert ds.SOPInstanceUID == uid
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
    finals = [p for p in storage.rglob("*.dcm") if not p.name.startswith(".")]
    assert len(finals) == len({p.name for p in finals}), "an instance stored twice"
    return by_uid


def test_kill_9_midway_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    port = free_port()
    storage, db = tmp_path / "storage", tmp_path / "queue.sqlite3"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dicom": {
                    "ae_title": AET,
                    "bind_host": "127.0.0.1",
                    "port": port,
                    "storage_dir": str(storage),
                    "min_free_disk_mb": 1,
                },
                "queue": {"database_url": f"sqlite:///{db}"},
                "results_dir": None,
                "logging": {"level": "INFO"},
            }
        )
    )
    items = _instances()
    server = ServiceProcess(config, role="scp")
    acked: list[str] = []
    try:
        server.start(port=port, ae_title=AET)
        sender = threading.Thread(target=_send_all, args=(port, items, acked, True), daemon=True)
        sender.start()
        deadline = time.monotonic() + 120
        while len(acked) < KILL_AFTER and sender.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(acked) >= KILL_AFTER, f"only {len(acked)} acknowledged before the deadline"
        server.kill9()
        sender.join(60)
        assert not sender.is_alive()
        assert len(acked) < N, "the kill came too late to test anything"
        assert len(set(acked)) == len(acked)

        by_uid = _check_consistent(storage, db, acked)
        assert len(by_uid) >= len(acked)

        server.start(port=port, ae_title=AET)  # restart on the same storage and database
        resent: list[str] = []
        _send_all(port, items, resent, stop_on_failure=False)  # the PACS retries everything
        assert sorted(resent) == sorted(str(d.SOPInstanceUID) for d in items)
        by_uid = _check_consistent(storage, db, [str(d.SOPInstanceUID) for d in items])
        assert len(by_uid) == N
        assert len([p for p in storage.rglob("*.dcm") if not p.name.startswith(".")]) == N
    finally:
        server.stop()
