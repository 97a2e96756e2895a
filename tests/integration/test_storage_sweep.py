"""The periodic storage sweep (``worker.scheduler.storage_sweep``, issue 10 finding 7) on the real
SQLite queue and real files: stale temp files go, a stored file with no queue row (written just
before a database failure) is registered and its study proceeds, an unreadable one is
quarantined, files kept aside and files still young are left alone; nothing from the patient's
data is logged."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from db.queue import Queue
from dicom_node.sink import SinkUnavailable, StoredInstance
from dicom_node.storage import QUARANTINE_DIR
from tests.dicom_net import RunningSCP, fresh, save, send
from tests.fakes import MemorySink
from worker.config import AppConfig, parse_config
from worker.scheduler import storage_sweep, sweep_min_age_s

pytestmark = pytest.mark.network

CANARY = "SWEEP^CANARY"
HOUR_AGO = time.time() - 3600


def make_cfg(storage: Path, **scheduler: float) -> AppConfig:
    return parse_config(
        {
            "dicom": {"storage_dir": str(storage)},
            "scheduler": {"storage_sweep_min_age_seconds": 60, **scheduler},
        },
        environ={},
    )


class DiesBeforeCommit(MemorySink):
    """The database goes down between the file's write and its row's commit."""

    def record_instance(self, inst: StoredInstance) -> bool:
        raise SinkUnavailable("database went down before the commit (test)")


def _age(path: Path, at: float = HOUR_AGO) -> Path:
    os.utime(path, (at, at))
    return path


def test_min_age_never_below_twice_the_longest_timeout(tmp_path: Path) -> None:
    assert sweep_min_age_s(make_cfg(tmp_path)) == 120.0  # 2 x the 60 s DIMSE/network timeouts
    assert sweep_min_age_s(make_cfg(tmp_path, storage_sweep_min_age_seconds=900)) == 900.0


def test_file_left_by_a_database_failure_is_registered_and_its_study_proceeds(
    start_scp: Callable[..., RunningSCP],
    sqlite_queue: Queue,
    sc_ds: Dataset,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a real association while the database is down: the file is on disk, no row, 0xA700
    run = start_scp(sink=DiesBeforeCommit())
    ds = fresh(sc_ds)
    ds.PatientName = CANARY
    assert send(run.port, ds) == [0xA700]
    rel = f"{ds.StudyInstanceUID}/{ds.SOPInstanceUID}.dcm"
    path = run.storage / rel
    assert path.is_file() and sqlite_queue.stored_rel_paths([ds.SOPInstanceUID]) == {}
    cfg = make_cfg(run.storage)

    report = storage_sweep(cfg, sqlite_queue)  # too young: an in-flight store is never touched
    assert report.registered == [] and report.quarantined == []
    assert sqlite_queue.study(ds.StudyInstanceUID) is None

    _age(path)
    with caplog.at_level(logging.DEBUG):
        report = storage_sweep(cfg, sqlite_queue)
    assert report.registered == [ds.SOPInstanceUID] and report.quarantined == []
    assert sqlite_queue.stored_rel_paths([ds.SOPInstanceUID]) == {ds.SOPInstanceUID: rel}
    detail = sqlite_queue.study(ds.StudyInstanceUID)
    assert detail is not None and detail.state == "receiving"
    (inst,) = detail.instances
    assert inst.eligible and inst.view == "frontal" and inst.calling_ae == "TEST_SCU"
    assert path.is_file()  # registered in place
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ds.SOPInstanceUID in text and CANARY not in text and "CANARY" not in text

    # the study goes on as if the instance had been recorded when it arrived
    future = detail.updated_at.replace(year=detail.updated_at.year + 1)
    assert sqlite_queue.sweep_completion(quiet_seconds=1, max_wait_seconds=5, now=future) == 1
    after = sqlite_queue.study(ds.StudyInstanceUID)
    assert after is not None and after.state == "ready"

    # idempotent: the next sweep finds the row and leaves the file alone
    again = storage_sweep(cfg, sqlite_queue)
    assert again.registered == [] and again.quarantined == [] and path.is_file()


def test_temp_unreadable_aside_young_and_recorded_files(
    tmp_path: Path, sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    storage = tmp_path / "storage"
    recorded = fresh(sc_ds)
    study = str(recorded.StudyInstanceUID)
    folder = storage / study
    folder.mkdir(parents=True)
    # a recorded instance (through the sweep itself), then the other cases beside it
    ok = _age(save(recorded, folder / f"{recorded.SOPInstanceUID}.dcm"))
    cfg = make_cfg(storage)
    assert storage_sweep(cfg, sqlite_queue).registered == [recorded.SOPInstanceUID]

    stale_tmp = folder / f".{recorded.SOPInstanceUID}.dcm.0123abcd.tmp"
    stale_tmp.write_bytes(b"half")
    _age(stale_tmp)
    fresh_tmp = folder / ".1.2.3.4.dcm.fedc.tmp"
    fresh_tmp.write_bytes(b"in flight")
    garbage = folder / "1.2.826.0.1.3680043.8.498.99.dcm"
    garbage.write_bytes(b"\x00" * 200 + b"not DICOM " + CANARY.encode())
    _age(garbage)
    aside = _age(save(fresh(sc_ds, study=study), folder / "1.2.3.aside-0123456789abcdef.dcm"))
    wrong_place = fresh(sc_ds)  # a readable file whose header names another study
    misplaced = _age(save(wrong_place, folder / f"{wrong_place.SOPInstanceUID}.dcm"))
    young = fresh(sc_ds, study=study)
    young_path = save(young, folder / f"{young.SOPInstanceUID}.dcm")
    knee = fresh(sc_ds, study=study)
    knee.BodyPartExamined = "KNEE"
    _age(save(knee, folder / f"{knee.SOPInstanceUID}.dcm"))
    not_a_study = storage / "results"  # a folder that is not a study: never looked into
    not_a_study.mkdir()
    other = _age(save(fresh(sc_ds), not_a_study / "1.2.3.4.dcm"))

    report = storage_sweep(cfg, sqlite_queue)

    assert report.temp_removed == 1 and not stale_tmp.exists() and fresh_tmp.exists()
    assert report.registered == [knee.SOPInstanceUID]
    assert sorted(report.quarantined) == sorted(
        [
            f"{QUARANTINE_DIR}/{study}/{garbage.name}",
            f"{QUARANTINE_DIR}/{study}/{misplaced.name}",
        ]
    )
    assert not garbage.exists() and (storage / report.quarantined[0]).is_file()
    assert not misplaced.exists()
    assert aside.is_file() and young_path.is_file() and ok.is_file() and other.is_file()
    detail = sqlite_queue.study(study)
    assert detail is not None
    by_uid = {i.sop_instance_uid: i for i in detail.instances}
    assert set(by_uid) == {recorded.SOPInstanceUID, knee.SOPInstanceUID}  # no aside, no young
    assert not by_uid[knee.SOPInstanceUID].eligible
    assert "BodyPartExamined KNEE" in (by_uid[knee.SOPInstanceUID].ineligible_reason or "")
    assert sqlite_queue.study(str(wrong_place.StudyInstanceUID)) is None
    # the quarantine is not a study folder: the next sweep leaves it alone
    assert storage_sweep(cfg, sqlite_queue).quarantined == []


def test_file_older_than_retention_is_quarantined_not_registered(
    tmp_path: Path, sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    storage = tmp_path / "storage"
    ds = fresh(sc_ds)
    (storage / ds.StudyInstanceUID).mkdir(parents=True)
    path = save(ds, storage / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm")
    _age(path, time.time() - 3 * 86400)
    report = storage_sweep(make_cfg(storage, retention_days=2), sqlite_queue)
    assert report.registered == [] and len(report.quarantined) == 1
    assert sqlite_queue.study(ds.StudyInstanceUID) is None  # a purged study is not analysed again
