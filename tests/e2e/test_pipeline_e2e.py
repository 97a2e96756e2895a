"""The whole service, end to end, on SQLite, with dcmtk's storescp as the PACS that takes reports.

PACS -> our SCP -> queue -> completion -> worker (views, mask, crop, Model 1, Model 2) -> TID 1500
SR (+ key image) -> C-STORE to storescp. Uses the committed model weights and real DICOM files only
(no ../shared)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE

from db.queue import Queue
from dicom_node.sr import read_findings
from tests.conftest import DATA, REPO, free_port
from tests.dicom_node.test_sr import validate
from tests.service import ServiceProcess, StoreSCP, wait_for, write_config

pytestmark = [pytest.mark.network, pytest.mark.slow]

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.22"}
SC = "1.2.840.10008.5.1.4.1.1.7"


def send(port: int, datasets: list[pydicom.Dataset], called: str = "CXR_WORKER") -> list[int]:
    ae = AE(ae_title="MODALITY")
    # one presentation context per (SOP class, transfer syntax) sent: the SCP accepts one syntax
    # each
    for pair in sorted({(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(*pair)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def terminal(queue: Queue, uids: list[str]) -> bool:
    for uid in uids:
        d = queue.study(uid)
        if d is None or d.state not in ("done", "ignored", "failed"):
            return False
        if d.state == "done" and any(x.state != "delivered" for x in d.deliveries):
            return False
    return True


@pytest.fixture
def running(tmp_path: Path, storescp: StoreSCP):
    port = free_port()
    cfg = write_config(
        tmp_path,
        port=port,
        destinations=[
            {
                "name": "pacs",
                "ae_title": storescp.aet,
                "host": "127.0.0.1",
                "port": storescp.port,
                "send_key_image": True,
            }
        ],
    )
    svc = ServiceProcess(cfg).start(port=port)
    queue = Queue.from_url(
        f"sqlite:///{tmp_path / 'queue.sqlite3'}", lease_seconds=60, max_attempts=3
    )
    try:
        yield port, svc, queue, storescp, tmp_path
    finally:
        svc.stop()
        queue.close()


def test_studies_come_back_as_valid_reports_for_the_same_patient(running) -> None:
    port, svc, queue, pacs, tmp_path = running
    frontal = pydicom.dcmread(DATA / "RG1_UNCR.dcm")
    sc = pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")
    extremity = pydicom.dcmread(DATA / "RG3_UNCR.dcm")
    lateral_only = copy.deepcopy(frontal)  # a chest study holding only a lateral view
    lateral_only.StudyInstanceUID = generate_uid()
    lateral_only.SeriesInstanceUID = generate_uid()
    lateral_only.SOPInstanceUID = lateral_only.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    lateral_only.ViewPosition = "LL"
    lateral_only.PatientID = "LATONLY"
    statuses = send(port, [frontal, sc, extremity, lateral_only])
    assert statuses == [0, 0, 0, 0]
    uids = [
        frontal.StudyInstanceUID,
        sc.StudyInstanceUID,
        extremity.StudyInstanceUID,
        lateral_only.StudyInstanceUID,
    ]
    wait_for(
        lambda: terminal(queue, uids),
        timeout_s=240,
        what="all studies finished and delivered",
        service=svc,
    )

    states = {u: queue.study(u) for u in uids}
    assert states[frontal.StudyInstanceUID].state == "done"
    assert states[sc.StudyInstanceUID].state == "done"
    assert states[extremity.StudyInstanceUID].state == "ignored"
    assert "EXTREMITY" in (states[extremity.StudyInstanceUID].state_reason or "")
    assert states[lateral_only.StudyInstanceUID].state == "ignored"
    assert "no frontal" in (states[lateral_only.StudyInstanceUID].state_reason or "")

    received = pacs.received()
    reports = [ds for ds in received if ds.SOPClassUID in SR_CLASSES]
    keys = [
        ds
        for ds in received
        if ds.SOPClassUID == SC
        and ds.get("SeriesDescription", "") != sc.get("SeriesDescription", "x")
    ]
    assert len(reports) == 2, [ds.SOPClassUID for ds in received]
    assert len(keys) == 2
    by_study = {ds.StudyInstanceUID: ds for ds in reports}
    for src in (frontal, sc):
        sr = by_study[src.StudyInstanceUID]
        assert sr.PatientID == src.PatientID and sr.PatientName == src.PatientName
        assert sr.SeriesInstanceUID != src.SeriesInstanceUID
        evidence = {
            ref.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        assert src.SOPInstanceUID in evidence
        findings = read_findings(sr)
        assert sum(f.model == "Model 2" for f in findings) == 14
        assert sum(f.model == "Model 1" for f in findings) == 1
        assert all(0.0 <= f.probability <= 1.0 for f in findings)
        path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
        sr.save_as(path, enforce_file_format=True)
        validate(path)
        result = queue.study(src.StudyInstanceUID).results[-1]
        assert result.report_sop_instance_uid == sr.SOPInstanceUID
        assert Path(result.payload["key_image_png"]).exists()
    for key in keys:
        assert key.BurnedInAnnotation == "YES"
        assert key.PatientID in {frontal.PatientID, sc.PatientID}


def test_late_image_reanalysis_replaces_report_and_resend_does_not_duplicate(running) -> None:
    port, svc, queue, pacs, tmp_path = running
    frontal = pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")
    frontal.StudyInstanceUID = generate_uid()
    frontal.SOPInstanceUID = frontal.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    uid = frontal.StudyInstanceUID
    assert send(port, [frontal]) == [0]
    wait_for(lambda: terminal(queue, [uid]), timeout_s=180, what="first report", service=svc)
    first = queue.study(uid).results[-1].report_sop_instance_uid

    late = copy.deepcopy(frontal)  # a late image of the same study: its lateral view
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    late.SeriesInstanceUID = generate_uid()
    late.ViewPosition = "LL"
    assert send(port, [late]) == [0]
    wait_for(
        lambda: (
            (d := queue.study(uid)) is not None and len(d.results) == 2 and terminal(queue, [uid])
        ),
        timeout_s=180,
        what="second report",
        service=svc,
    )
    second = queue.study(uid).results[-1].report_sop_instance_uid
    assert second != first
    reports = {ds.SOPInstanceUID: ds for ds in pacs.received() if ds.SOPClassUID in SR_CLASSES}
    assert set(reports) == {first, second}
    assert queue.study(uid).results[-1].payload["used_lateral"] is True
    pred = (
        reports[second]
        .PredecessorDocumentsSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
    )
    assert pred.ReferencedSOPInstanceUID == first

    # resend: the same report (same SOP Instance UID) goes out again, nothing new is created
    before = len(list(pacs.out.iterdir()))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "resend",
            uid,
            "--config",
            str(tmp_path / "config.yaml"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    wait_for(
        lambda: terminal(queue, [uid]) and len(list(pacs.out.iterdir())) > before,
        timeout_s=60,
        what="resend",
        service=svc,
    )
    assert {ds.SOPInstanceUID for ds in pacs.received() if ds.SOPClassUID in SR_CLASSES} == {
        first,
        second,
    }
