"""A real PACS (Orthanc) pushes instances to our SCP through its REST API."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from db.queue import Queue
from tests.conftest import DATA
from tests.dicom_net import SCP_AET, RunningSCP, fresh, save
from tests.orthanc import Orthanc, OrthancError, orthanc_available

pytestmark = [
    pytest.mark.orthanc,
    pytest.mark.network,
    pytest.mark.slow,
    pytest.mark.skipif(
        not orthanc_available(), reason="Orthanc is not installed (apt-get install orthanc)"
    ),
]


def test_orthanc_pushes_studies_to_the_scp(
    start_scp: Callable[..., RunningSCP], any_queue: Queue, tmp_path: Path, sc_ds: Dataset
) -> None:
    run = start_scp(any_queue, allowed_calling_ae_titles=["ORTHANC_T"])
    mono1 = save(fresh(pydicom.dcmread(DATA / "siim_fake_monochrome1.dcm")), tmp_path / "mono1.dcm")
    files = [
        DATA / "RG1_UNCR.dcm",
        DATA / "RG1_J2KR.dcm",
        DATA / "siim_cr_pa_secondary_capture.dcm",
        mono1,
        DATA / "RG3_UNCR.dcm",
    ]
    with Orthanc.start(
        tmp_path / "orthanc", aet="ORTHANC_T", modalities={"cxr": (SCP_AET, run.port)}
    ) as pacs:
        ids = [pacs.upload(f) for f in files]
        assert sorted(pacs.instances()) == sorted(ids)
        echo = pacs.post("/modalities/cxr/echo", {})
        assert echo == {} or echo is None
        rsp = pacs.store_to("cxr", ids)
        assert rsp["InstancesCount"] == len(files)
        assert rsp["FailedInstancesCount"] == 0

        # a second push of the same instances: duplicates, acknowledged, not stored twice
        pacs.store_to("cxr", ids[:2])

    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        path = run.storage / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert path.is_file(), f"{f.name} was not stored"
        stored = pydicom.dcmread(path)
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
        assert stored.file_meta.SourceApplicationEntityTitle == "ORTHANC_T"
        assert any_queue.instance_exists(ds.SOPInstanceUID)
    rg1 = any_queue.study(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert rg1 is not None and len(rg1.instances) == 2  # RG1_UNCR + RG1_J2KR, each once
    assert all(i.calling_ae == "ORTHANC_T" and i.eligible for i in rg1.instances)
    rg3 = any_queue.study(
        pydicom.dcmread(DATA / "RG3_UNCR.dcm", stop_before_pixels=True).StudyInstanceUID
    )
    assert rg3 is not None and [i.eligible for i in rg3.instances] == [False]
    assert len(run.files()) == len(files)


def test_orthanc_with_wrong_called_ae_is_refused(
    start_scp: Callable[..., RunningSCP], sqlite_queue: Queue, tmp_path: Path
) -> None:
    run = start_scp(sqlite_queue)
    with Orthanc.start(
        tmp_path / "orthanc", aet="ORTHANC_T", modalities={"wrong": ("NOT_CXR", run.port)}
    ) as pacs:
        ident = pacs.upload(DATA / "siim_cr_pa_secondary_capture.dcm")
        with pytest.raises(OrthancError):
            pacs.store_to("wrong", [ident])
    assert run.files() == []


def test_fixture_stops_orthanc_by_pid(tmp_path: Path) -> None:
    pacs = Orthanc.launch(tmp_path / "o")
    pid = pacs.proc.pid
    assert pacs.get("/system")["DicomAet"] == "ORTHANC"
    pacs.stop()
    assert pacs.proc.poll() is not None
    assert (
        not Path(f"/proc/{pid}").exists()
        or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    )
    assert shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").exists()
