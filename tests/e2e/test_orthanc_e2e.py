"""Against a real PACS: Orthanc (Debian package) auto-routes CR/DX to the worker with a Lua
``OnStoredInstance`` script; ``storescu`` sends a frontal (RG1) and a real CheXpert lateral wrapped
as DX (ViewPosition LL) in the same study; the worker analyses the pair and sends the SR back; the
test finds the SR in Orthanc, in the same study, and checks its content and validity."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from db.queue import Queue
from dicom_node.sr import read_findings
from tests.conftest import DATA, free_port
from tests.dicom_factory import wrap_as_dx
from tests.dicom_node.test_sr import validate
from tests.orthanc import Orthanc, orthanc_available
from tests.service import ServiceProcess, wait_for, write_config

pytestmark = [
    pytest.mark.network,
    pytest.mark.slow,
    pytest.mark.orthanc,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed (make system-deps)"),
]

LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   local modality = tags['Modality']
   if modality == 'CR' or modality == 'DX' then
      SendToModality(instanceId, 'cxr')
   end
end
"""


def _chexpert_lateral(shared: Path) -> Path:
    root = shared / "chexpert_sample"
    with open(root / "CheXpert-v1.0" / "train.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Frontal/Lateral"] == "Lateral":
                return root / row["Path"]
    pytest.skip("no lateral image in the CheXpert sample")


def _series_in_study(pacs: Orthanc, study_uid: str) -> list[dict]:
    found = pacs.request("POST", "/tools/lookup", study_uid.encode(), "text/plain")
    ids = [x["ID"] for x in (found or []) if x.get("Type") == "Study"]
    if not ids:
        return []
    return list(pacs.get(f"/studies/{ids[0]}/series"))


def test_orthanc_routes_study_and_gets_the_report_back(tmp_path: Path, shared_data: Path) -> None:
    worker_port = free_port()
    lua = tmp_path / "route.lua"
    lua.write_text(LUA)
    with Orthanc.start(
        tmp_path / "orthanc",
        aet="ORTHANC",
        modalities={"cxr": ("CXR_WORKER", worker_port)},
        lua_script=lua,
    ) as pacs:
        cfg = write_config(
            tmp_path,
            port=worker_port,
            dicom={"allowed_calling_ae_titles": ["ORTHANC"]},
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
        with ServiceProcess(cfg).start(port=worker_port, calling_ae="ORTHANC"):
            frontal = pydicom.dcmread(DATA / "RG1_UNCR.dcm")
            lateral = wrap_as_dx(_chexpert_lateral(shared_data), like=frontal, view_position="LL")
            lateral_path = tmp_path / "lateral.dcm"
            lateral.save_as(lateral_path, enforce_file_format=True)
            storescu = shutil.which("storescu")
            assert storescu, "dcmtk storescu missing (make system-deps)"
            out = subprocess.run(
                [
                    storescu,
                    "-aet",
                    "MODALITY",
                    "-aec",
                    "ORTHANC",
                    "127.0.0.1",
                    str(pacs.dicom_port),
                    str(DATA / "RG1_UNCR.dcm"),
                    str(lateral_path),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr

            def sr_series() -> list[dict]:
                return [
                    s
                    for s in _series_in_study(pacs, frontal.StudyInstanceUID)
                    if s["MainDicomTags"].get("Modality") == "SR"
                ]

            series = wait_for(sr_series, timeout_s=300, what="the SR to arrive in Orthanc")
            sr_bytes = pacs.instance_file(series[0]["Instances"][0])
            sr_path = tmp_path / "report.dcm"
            sr_path.write_bytes(sr_bytes)
            sr = pydicom.dcmread(sr_path)
            assert sr.StudyInstanceUID == frontal.StudyInstanceUID
            assert sr.PatientID == frontal.PatientID
            evidence = {
                ref.ReferencedSOPInstanceUID
                for st in sr.CurrentRequestedProcedureEvidenceSequence
                for se in st.ReferencedSeriesSequence
                for ref in se.ReferencedSOPSequence
            }
            assert evidence == {frontal.SOPInstanceUID, lateral.SOPInstanceUID}
            findings = read_findings(sr)
            assert sum(f.model == "Model 2" for f in findings) == 14
            assert sum(f.model == "Model 1" for f in findings) == 1
            validate(sr_path)

            queue = Queue.from_url(
                f"sqlite:///{tmp_path / 'queue.sqlite3'}", lease_seconds=60, max_attempts=3
            )
            detail = queue.study(frontal.StudyInstanceUID)
            assert detail is not None and detail.state == "done"
            payload = detail.results[-1].payload
            assert payload["used_lateral"] is True
            assert payload["lateral_sop_instance_uid"] == lateral.SOPInstanceUID
            queue.close()
