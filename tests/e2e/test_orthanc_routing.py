"""Routing as a hospital PACS does it, against a real Orthanc (Debian package): an ``OnStableStudy``
Lua rule sends the WHOLE study to the worker every time the study settles, reports and key images
included (``POST /modalities/cxr/store``: one DicomModalityStore job per settling).

- whole study: the radiographs plus a dose SR, a text SR, a key object selection, a presentation
  state, a scanned requisition and a PDF. Every Orthanc job succeeds (the worker accepts every
  storage class), the study is analysed once, one report (and one key image) comes back, and
  their coming back again with the next routing reopens nothing;
- completion rules: a frontal whose lateral follows within the lateral grace is analysed once,
  with the lateral; a lateral that arrives after the report reopens the study, and the second
  report replaces the first (Predecessor Documents, InstanceNumber 2, the reason in its text).

The numbers of jobs, analyses and reports are asserted exactly."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset

from db.queue import Queue
from dicom_node.derived import DeviceInfo, key_image_series_uid, report_series_uid
from tests.conftest import DATA, free_port
from tests.dicom_net import fresh
from tests.orthanc import Orthanc, orthanc_available
from tests.service import ServiceProcess, wait_for, write_config
from tests.study_objects import relabelled_lateral, whole_study_extras

pytestmark = [
    pytest.mark.network,
    pytest.mark.slow,
    pytest.mark.orthanc,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed (make system-deps)"),
]

#: The usual whole-study auto-routing rule: when a study has been quiet for StableAge seconds,
#: send all of it (an asynchronous DicomModalityStore job, listed under /jobs).
ROUTE_STABLE_STUDIES = """
function OnStableStudy(studyId, tags, metadata)
   RestApiPost('/modalities/cxr/store',
               '{"Resources": ["' .. studyId .. '"], "Asynchronous": true}')
end
"""
WORKER_AET = "CXR_WORKER"
DEVICE = DeviceInfo(ae_title=WORKER_AET)  # the identity the service's reports carry


class Setup:
    """Orthanc routing whole studies to a running ``cxr-worker serve`` that reports back."""

    def __init__(self, tmp: Path, pacs: Orthanc, svc: ServiceProcess, health_port: int) -> None:
        self.tmp, self.pacs, self.svc, self.health_port = tmp, pacs, svc, health_port
        self.queue = Queue.from_url(
            f"sqlite:///{tmp / 'queue.sqlite3'}", lease_seconds=60, max_attempts=3
        )

    def upload(self, *items: Dataset) -> None:
        for ds in items:
            path = self.tmp / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            self.pacs.upload(path)

    def jobs(self, study_uid: str) -> list[dict[str, Any]]:
        sid = self.pacs.study_id(study_uid)
        return [
            j for j in self.pacs.jobs() if sid in j.get("Content", {}).get("ParentResources", [])
        ]

    def wait_jobs_done(
        self, study_uid: str, n: int, timeout_s: float = 240
    ) -> list[dict[str, Any]]:
        def done() -> list[dict[str, Any]] | None:
            jobs = self.jobs(study_uid)
            finished = [j for j in jobs if j["State"] in ("Success", "Failure")]
            return jobs if len(jobs) >= n and len(finished) == len(jobs) else None

        return list(
            wait_for(done, timeout_s=timeout_s, what=f"{n} Orthanc job(s)", service=self.svc)
        )

    def ours(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        """Orthanc's instances of one of the worker's series, by InstanceNumber."""
        sid = self.pacs.study_id(study_uid)
        if sid is None:
            return []
        for series in self.pacs.get(f"/studies/{sid}/series"):
            if series["MainDicomTags"].get("SeriesInstanceUID") == series_uid:
                rows = list(self.pacs.get(f"/series/{series['ID']}/instances"))
                return sorted(rows, key=lambda r: int(r["MainDicomTags"].get("InstanceNumber", 0)))
        return []

    def reports(self, study_uid: str) -> list[dict[str, Any]]:
        return self.ours(study_uid, report_series_uid(study_uid, DEVICE))

    def key_images(self, study_uid: str) -> list[dict[str, Any]]:
        return self.ours(study_uid, key_image_series_uid(study_uid, DEVICE))

    def analyses(self, study_uid: str) -> int:
        return sum(e.to_state == "processing" for e in self.queue.events(study_uid))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.health_port}/metrics"
        with urllib.request.urlopen(url, timeout=20) as rsp:
            text = rsp.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): float(s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def dataset(self, instance: dict[str, Any]) -> Dataset:
        path = self.tmp / f"from-orthanc-{instance['ID']}.dcm"
        path.write_bytes(self.pacs.instance_file(instance["ID"]))
        return pydicom.dcmread(path)


def _start(tmp_path: Path, *, lateral_grace_seconds: float) -> tuple[Orthanc, ServiceProcess, int]:
    worker_port = free_port()
    lua = tmp_path / "route.lua"
    lua.write_text(ROUTE_STABLE_STUDIES)
    pacs = Orthanc.launch(
        tmp_path / "orthanc",
        aet="ORTHANC",
        modalities={"cxr": (WORKER_AET, worker_port)},
        lua_script=lua,
    )
    cfg = write_config(
        tmp_path,
        port=worker_port,
        dicom={"allowed_calling_ae_titles": ["ORTHANC", "TEST_SCU"]},
        completion={"lateral_grace_seconds": lateral_grace_seconds},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
                "send_key_image": True,
            }
        ],
    )
    health_port = int(yaml.safe_load(cfg.read_text())["health"]["port"])
    try:
        svc = ServiceProcess(cfg).start(port=worker_port)
    except BaseException:
        pacs.stop()
        raise
    return pacs, svc, health_port


def _settle(s: Setup, seconds: float = 8.0) -> None:
    """Long enough for anything still to happen: Orthanc's StableAge (2 s), the worker's quiet
    period (2 s) and sweep, and a claim."""
    time.sleep(seconds)


def test_whole_study_routing_jobs_all_succeed_one_analysis_one_report(tmp_path: Path) -> None:
    pacs, svc, health_port = _start(tmp_path, lateral_grace_seconds=0)
    try:
        s = Setup(tmp_path, pacs, svc, health_port)
        sc = pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")
        frontal = fresh(sc)
        lateral = relabelled_lateral(sc, frontal)
        extras = whole_study_extras(frontal, [frontal, lateral])
        study = frontal.StudyInstanceUID
        s.upload(frontal, lateral, *extras)  # 8 objects

        wait_for(lambda: s.reports(study), timeout_s=300, what="the report in Orthanc", service=svc)
        # the report and key image changed the study: Orthanc routes all 10 objects again
        jobs = s.wait_jobs_done(study, 2)
        _settle(s)
        jobs = s.jobs(study)
        assert [(j["State"], j["Content"]["InstancesCount"]) for j in jobs] == [
            ("Success", 8),
            ("Success", 10),
        ], json.dumps(jobs, indent=1)
        assert all(j["Content"]["FailedInstancesCount"] == 0 for j in jobs)

        detail = s.queue.study(study)
        assert detail is not None and detail.state == "done" and detail.reopened_count == 0
        assert s.analyses(study) == 1
        assert len(detail.results) == 1
        assert len(detail.instances) == 10
        assert {i.sop_instance_uid for i in detail.instances if i.eligible} == {
            frontal.SOPInstanceUID,
            lateral.SOPInstanceUID,
        }
        own = [i for i in detail.instances if (i.ineligible_reason or "").startswith("this worker")]
        assert len(own) == 2  # its report and key image, routed back, stored only

        [report] = s.reports(study)
        assert len(s.key_images(study)) == 1
        assert len(pacs.study_instances(study)) == 10
        sr = s.dataset(report)
        assert sr.SOPInstanceUID == detail.results[0].report_sop_instance_uid
        assert int(sr.InstanceNumber) == 1 and "PredecessorDocumentsSequence" not in sr
        assert detail.results[0].payload["lateral_sop_instance_uid"] == lateral.SOPInstanceUID

        m = s.metrics()
        assert m[("cxr_analysis_seconds_count", ())] == 1
        assert m[("cxr_end_to_end_seconds_count", ())] == 1
        assert m[("cxr_instances_received_total", (("status", "0x0000 Success"),))] == 18
        assert m[("cxr_deliveries", (("destination", "pacs"), ("state", "delivered")))] == 2
        assert m[("cxr_delivery_failed_attempts", (("destination", "pacs"),))] == 0
        assert m[("cxr_studies", (("state", "done"),))] == 1
    finally:
        svc.stop()
        pacs.stop()


def _texts(ds: Dataset) -> list[str]:
    out = []
    for elem in ds.iterall():
        if elem.keyword in ("TextValue", "ContentDescription", "ImageComments"):
            out.append(str(elem.value))
    return out


def test_lateral_grace_and_a_late_lateral_superseding_the_report(tmp_path: Path) -> None:
    """Two studies at once. A: the lateral follows the frontal within the grace (12 s): one
    analysis, with the lateral. B: the lateral comes after the report: reopened, analysed again,
    and report 2 replaces report 1."""
    pacs, svc, health_port = _start(tmp_path, lateral_grace_seconds=12)
    try:
        s = Setup(tmp_path, pacs, svc, health_port)
        sc = pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm")
        a_frontal, b_frontal = fresh(sc), fresh(sc)
        a_lateral = relabelled_lateral(sc, a_frontal)
        b_lateral = relabelled_lateral(sc, b_frontal)
        a, b = a_frontal.StudyInstanceUID, b_frontal.StudyInstanceUID

        s.upload(a_frontal, b_frontal)
        s.wait_jobs_done(a, 1)  # A's frontal reached the worker, which now waits for a lateral
        s.upload(a_lateral)

        # B: no lateral within the grace -> report 1 from the frontal alone
        wait_for(lambda: s.reports(b), timeout_s=300, what="report 1 of B", service=svc)
        s.wait_jobs_done(b, 2)  # report 1 and its key image routed back: nothing reopens
        _settle(s)
        assert s.analyses(b) == 1 and s.queue.study(b).state == "done"  # type: ignore[union-attr]
        s.upload(b_lateral)  # the late lateral
        wait_for(lambda: len(s.reports(b)) == 2, timeout_s=300, what="report 2 of B", service=svc)
        s.wait_jobs_done(b, 4)
        wait_for(lambda: s.reports(a), timeout_s=300, what="the report of A", service=svc)
        s.wait_jobs_done(a, 3)
        _settle(s)

        # A: frontal alone, frontal + lateral, then everything with the report: 3 jobs
        jobs_a = s.jobs(a)
        assert [(j["State"], j["Content"]["InstancesCount"]) for j in jobs_a] == [
            ("Success", 1),
            ("Success", 2),
            ("Success", 4),
        ], json.dumps(jobs_a, indent=1)
        da = s.queue.study(a)
        assert da is not None and da.state == "done" and da.reopened_count == 0
        assert s.analyses(a) == 1 and len(da.results) == 1
        assert da.results[0].payload["lateral_sop_instance_uid"] == a_lateral.SOPInstanceUID
        [ra] = s.reports(a)
        assert int(s.dataset(ra).InstanceNumber) == 1

        # B: frontal; frontal + report 1 + key 1; + the lateral; + report 2 + key 2
        jobs_b = s.jobs(b)
        assert [(j["State"], j["Content"]["InstancesCount"]) for j in jobs_b] == [
            ("Success", 1),
            ("Success", 3),
            ("Success", 4),
            ("Success", 6),
        ], json.dumps(jobs_b, indent=1)
        db_ = s.queue.study(b)
        assert db_ is not None and db_.state == "done" and db_.reopened_count == 1
        assert s.analyses(b) == 2 and len(db_.results) == 2
        first, second = db_.results
        assert first.superseded and not second.superseded
        assert first.payload["lateral_sop_instance_uid"] is None
        assert second.payload["lateral_sop_instance_uid"] == b_lateral.SOPInstanceUID
        # what the PACS holds: both reports in one series, numbered, the second naming the first
        r1, r2 = (s.dataset(x) for x in s.reports(b))
        assert (r1.SOPInstanceUID, r2.SOPInstanceUID) == (
            first.report_sop_instance_uid,
            second.report_sop_instance_uid,
        )
        assert (int(r1.InstanceNumber), int(r2.InstanceNumber)) == (1, 2)
        assert r1.SeriesInstanceUID == r2.SeriesInstanceUID
        [pred] = r2.PredecessorDocumentsSequence
        refs = [
            ref.ReferencedSOPInstanceUID
            for series in pred.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        ]
        assert refs == [r1.SOPInstanceUID]
        reason = "a late lateral (LL) arrived after report 1"
        assert any(reason in t for t in _texts(r2)), _texts(r2)
        assert not any("late lateral" in t for t in _texts(r1))
        assert len(s.key_images(b)) == 2
        events = [e.reason or "" for e in s.queue.events(b)]
        assert any(e.startswith("complete: a frontal and no lateral after the 12s") for e in events)
        assert any(e.startswith("reopened: an image arrived after the report") for e in events)
    finally:
        svc.stop()
        pacs.stop()
