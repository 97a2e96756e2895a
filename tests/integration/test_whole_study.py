"""A whole chest study over a real association into the real queue: every object a PACS sends with
the radiographs (SRs, key objects, presentation states, scans, PDFs) is acknowledged, stored as
received and never analysed; the worker's own report and key image are recognised by their series;
a turned-away association is logged with who asked and why."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from db.queue import Queue
from dicom_node.config import DicomNodeConfig
from dicom_node.derived import DeviceInfo, key_image_series_uid, report_series_uid
from dicom_node.scp import StorageSCP
from tests.dicom_net import SCP_AET, RunningSCP, free_port, fresh, send
from tests.fakes import MemorySink
from tests.study_objects import (
    BASIC_TEXT_SR,
    ENCAPSULATED_PDF,
    GRAYSCALE_PR,
    KEY_OBJECT_SELECTION,
    XRAY_DOSE_SR,
    relabelled_lateral,
    text_report,
    whole_study_extras,
)

pytestmark = pytest.mark.network


def test_whole_study_is_acknowledged_stored_and_only_radiographs_are_eligible(
    start_scp: Callable[..., RunningSCP], sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    run = start_scp(sqlite_queue)
    frontal = fresh(sc_ds)
    lateral = relabelled_lateral(sc_ds, frontal)
    extras = whole_study_extras(frontal, [frontal, lateral])
    statuses = send(run.port, frontal, lateral, *extras)
    assert statuses == [0x0000] * 8, statuses

    d = sqlite_queue.study(frontal.StudyInstanceUID)
    assert d is not None and d.state == "receiving"
    rows = {i.sop_instance_uid: i for i in d.instances}
    assert len(rows) == 8
    eligible = {u for u, i in rows.items() if i.eligible}
    assert eligible == {frontal.SOPInstanceUID, lateral.SOPInstanceUID}
    assert (rows[frontal.SOPInstanceUID].view, rows[lateral.SOPInstanceUID].view) == (
        "frontal",
        "lateral",
    )
    reasons = {rows[x.SOPInstanceUID].sop_class_uid: rows[x.SOPInstanceUID] for x in extras}
    for sop_class in (BASIC_TEXT_SR, XRAY_DOSE_SR):
        assert reasons[sop_class].ineligible_reason == "Modality SR is not a radiograph (CR or DX)"
    assert reasons[KEY_OBJECT_SELECTION].ineligible_reason.startswith("Modality KO is not")
    assert reasons[GRAYSCALE_PR].ineligible_reason.startswith("Modality PR is not")
    assert reasons[ENCAPSULATED_PDF].ineligible_reason.startswith("Modality DOC is not")
    assert all(i.view is None for i in reasons.values())
    # stored byte for byte as received, each under the study's folder
    for x in extras:
        path = run.storage / rows[x.SOPInstanceUID].rel_path
        assert path.is_file() and path.parent.name == frontal.StudyInstanceUID


def test_own_report_and_key_image_are_recognised_by_their_series(
    start_scp: Callable[..., RunningSCP], sqlite_queue: Queue, sc_ds: Dataset
) -> None:
    """The key image is a chest Secondary Capture with Modality CR: without its series it would
    be analysed (and, once, was: a 2-image study analysed 3 times)."""
    run = start_scp(sqlite_queue)
    frontal = fresh(sc_ds)
    device = DeviceInfo(ae_title=SCP_AET)  # the identity the SCP was started with
    report = text_report(frontal)
    report.SeriesInstanceUID = report_series_uid(frontal.StudyInstanceUID, device)
    key = fresh(sc_ds, study=frontal.StudyInstanceUID)
    key.SeriesInstanceUID = key_image_series_uid(frontal.StudyInstanceUID, device)
    other_worker = fresh(sc_ds, study=frontal.StudyInstanceUID)
    other_worker.SeriesInstanceUID = key_image_series_uid(
        frontal.StudyInstanceUID, DeviceInfo(ae_title="SOMEONE_ELSE")
    )
    assert send(run.port, frontal, report, key, other_worker) == [0] * 4
    d = sqlite_queue.study(frontal.StudyInstanceUID)
    assert d is not None
    got = {i.sop_instance_uid: (i.eligible, i.ineligible_reason) for i in d.instances}
    assert got[report.SOPInstanceUID] == (
        False,
        "this worker's own report (its SR series), stored only",
    )
    assert got[key.SOPInstanceUID] == (
        False,
        "this worker's own key image (its key image series), stored only",
    )
    assert got[other_worker.SOPInstanceUID] == (True, None)  # another AE title: not ours
    assert got[frontal.SOPInstanceUID] == (True, None)


class CountingEvents:
    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.rejected: list[str] = []

    def instance_received(self, status: int) -> None:
        self.statuses.append(status)

    def association_rejected(self, reason: str) -> None:
        self.rejected.append(reason)


def _associate(port: int, *, calling: str, called: str) -> bool:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    ok = bool(assoc.is_established)
    if ok:
        assoc.release()
    return ok


def test_rejected_associations_are_logged_with_who_and_why(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    events = CountingEvents()
    cfg = DicomNodeConfig(
        ae_title=SCP_AET,
        port=free_port(),
        storage_dir=tmp_path / "s",
        min_free_disk_mb=1,
        allowed_calling_ae_titles=["ORTHANC"],
    )
    with (
        caplog.at_level(logging.WARNING, logger="dicom_node.scp"),
        StorageSCP(cfg, MemorySink(), events=events),
    ):
        assert not _associate(cfg.port, calling="STRANGER", called=SCP_AET)
        assert not _associate(cfg.port, calling="ORTHANC", called="NOT_US")
        assert _associate(cfg.port, calling="ORTHANC", called=SCP_AET)
    lines = [r.getMessage() for r in caplog.records if "association rejected" in r.getMessage()]
    assert any(
        line.startswith("association rejected: calling AE 'STRANGER', called AE 'CXR_TEST', from ")
        and line.endswith(": calling AE title not recognised (dicom.allowed_calling_ae_titles)")
        for line in lines
    ), lines
    assert any(
        "calling AE 'ORTHANC', called AE 'NOT_US', from 127.0.0.1:" in line
        and line.endswith("called AE title not recognised (dicom.ae_title)")
        for line in lines
    ), lines
    assert events.rejected[:2] == [
        "calling AE title not recognised",
        "called AE title not recognised",
    ]
