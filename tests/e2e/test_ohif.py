"""The worker's report in the real OHIF viewer, and in the SR tooling OHIF is built on.

- ``test_ohif_shows_each_present_finding``: a real PACS (Orthanc with Debian's DICOMweb plugin)
  auto-routes a chest radiograph (``storescu`` as the modality) to the running worker
  (``cxr-worker serve``, the committed models), which sends its report and key image back. OHIF
  3.13.2's built ``dist/`` (npm ``@ohif/app``), served on 127.0.0.1 with its data source at that
  Orthanc, opens the study in Debian's chromium; the test double-clicks the report like a
  radiologist and asserts that the page draws every Present finding with its name and
  probability (and Model 1's decision) on the image, and no Absent one. The screenshot is kept
  under the test's output and copied to ``var/test-artifacts/ohif_sr.png``.
- ``test_ohif_draws_the_cardiothoracic_ratio``: the same viewer on a report with a measured
  ratio: both lines and the ratio are drawn.
- ``test_dcmjs_reads_the_report``: dcmjs + the Cornerstone3D MeasurementReport adapter OHIF uses
  read reports with 0, 3 and 14 Present findings (and a ratio) without throwing, into one
  measurement per marked finding.

Everything they need is installed by ``make viewer-deps`` (a prerequisite of ``make test``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node import codes
from dicom_node.sr import (
    AlgorithmInfo,
    CropInfo,
    CtrInfo,
    FindingResult,
    LineInfo,
    MaskQualityInfo,
    ReportedFinding,
    ReportInput,
    build_report,
    read_findings,
    write_report,
)
from tests.conftest import DATA, REPO, free_port
from tests.dicom_node.test_sr import validate
from tests.e2e.test_pipeline_e2e import send
from tests.ohif import OhifServer, run_node
from tests.orthanc import Orthanc, orthanc_available
from tests.service import ServiceProcess, wait_for, write_config

pytestmark = [
    pytest.mark.network,
    pytest.mark.slow,
    pytest.mark.orthanc,
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc not installed (make system-deps)"),
]

ARTIFACTS = REPO / "var" / "test-artifacts"
SR_SERIES = "CXR AI findings"
# PACS routes radiographs to the worker; the worker's own outputs (its series description says
# so) are not sent back to it
LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
   local modality = tags['Modality']
   local series = tags['SeriesDescription'] or ''
   if (modality == 'CR' or modality == 'DX') and string.find(series, 'CXR AI', 1, true) == nil then
      SendToModality(instanceId, 'cxr')
   end
end
"""
LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip


def drawn_label(f: ReportedFinding) -> str:
    """How OHIF labels a marked finding: its code's meaning, then the probability (2 decimals)."""
    return f"{codes.finding_code(f.label).meaning}: {f.probability:.2f}"


def _study_series(pacs: Orthanc, study_uid: str) -> list[dict]:
    found = pacs.request("POST", "/tools/lookup", study_uid.encode(), "text/plain")
    ids = [x["ID"] for x in (found or []) if x.get("Type") == "Study"]
    return list(pacs.get(f"/studies/{ids[0]}/series")) if ids else []


def _keep(screenshot: Path, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(screenshot, ARTIFACTS / name))


def _viewport_shows_an_image(screenshot: Path) -> float:
    """The grey-level spread in the middle of the viewport (a black, unloaded viewport is ~0)."""
    img = cv2.imread(str(screenshot), cv2.IMREAD_GRAYSCALE)
    assert img is not None, f"cannot read {screenshot}"
    h, w = img.shape
    return float(np.std(img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3]))


def _check_page(page: dict, present: list[ReportedFinding], absent: list[ReportedFinding]) -> None:
    assert page["ok"], f"OHIF did not show {page['missing']}; errors: {page['errors'][:5]}"
    assert not [e for e in page["errors"] if e.startswith("pageerror")], page["errors"][:5]
    drawn = "\n".join(page["svgText"])  # the annotation text boxes drawn over the image
    for f in present:
        assert drawn_label(f) in drawn, f"{f.label} is not drawn on the image"
    for f in absent:  # Absent findings stay in the report's evaluations, not on the image
        assert f"{codes.finding_code(f.label).meaning}: " not in drawn, f.label


def test_ohif_shows_each_present_finding(tmp_path: Path) -> None:
    frontal_path = DATA / "siim_cr_pa_secondary_capture.dcm"
    frontal = pydicom.dcmread(frontal_path, stop_before_pixels=True)
    worker_port = free_port()
    lua = tmp_path / "route.lua"
    lua.write_text(LUA)
    with Orthanc.start(
        tmp_path / "orthanc",
        aet="ORTHANC",
        modalities={"cxr": ("CXR_WORKER", worker_port)},
        lua_script=lua,
        dicomweb=True,
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
        with ServiceProcess(cfg).start(port=worker_port, calling_ae="ORTHANC") as svc:
            # the modality sends the image to PACS (in its own JPEG transfer syntax)
            statuses = send(pacs.dicom_port, [pydicom.dcmread(frontal_path)], called="ORTHANC")
            assert statuses == [0]

            def outputs() -> dict[str, dict] | None:
                by_modality = {
                    s["MainDicomTags"].get("Modality"): s
                    for s in _study_series(pacs, str(frontal.StudyInstanceUID))
                    if "CXR AI" in s["MainDicomTags"].get("SeriesDescription", "")
                }
                return by_modality if {"SR"} <= set(by_modality) and len(by_modality) == 2 else None

            series = wait_for(
                outputs, timeout_s=300, what="the report and key image in Orthanc", service=svc
            )
        sr_path = tmp_path / "report.dcm"
        sr_path.write_bytes(pacs.instance_file(series["SR"]["Instances"][0]))
        validate(sr_path)  # dciodvfy: no error; dsrdump reads it
        sr = pydicom.dcmread(sr_path)
        assert sr.SOPClassUID == pydicom.uid.EnhancedSRStorage
        assert sr.StudyInstanceUID == frontal.StudyInstanceUID
        findings = read_findings(sr)
        assert len(findings) == 15
        present = [f for f in findings if f.present or f.model == "Model 1"]
        absent = [f for f in findings if not f.present and f.model == "Model 2"]

        # the SR tooling OHIF is built on reads it: one rectangle per marked finding
        tool = run_node("dcmjs_sr.mjs", str(sr_path))
        assert tool["ok"] and tool["count"] == len(present), tool
        assert tool["toolState"] == {"RectangleROI": len(present)}, tool

        with OhifServer.start(pacs.url) as ohif:
            shot = tmp_path / "ohif_sr.png"
            expected = [drawn_label(f) for f in present]
            page = run_node(
                "ohif_sr.mjs",
                ohif.viewer_url(str(frontal.StudyInstanceUID)),
                SR_SERIES,
                str(shot),
                *expected,
                check=False,
            )
            kept = _keep(shot, "ohif_sr.png") if shot.exists() else None
            assert kept is not None, f"no screenshot; page: {page}"
            _check_page(page, present, absent)
            assert "dicom-web" in " ".join(ohif.requests)  # it read Orthanc through DICOMweb
        assert _viewport_shows_an_image(shot) > 20, f"the viewport looks empty: {kept}"


def _box(i: int, cols: int) -> CropInfo:
    """A 150 x 160 px box per finding, spread over the image."""
    x = 60 * i % (cols - 200)
    return CropInfo(x, 100 + 40 * i, x + 150, 260 + 40 * i)


def _report_input(frontal: Dataset, n_present: int, ctr: CtrInfo | None) -> ReportInput:
    probs = [0.95 - 0.03 * i if i < n_present else 0.1 for i in range(len(LABELS))]
    rows, cols = int(frontal.Rows), int(frontal.Columns)
    return ReportInput(
        frontal=frontal,
        model1=FindingResult("Abnormal", 0.9 if n_present else 0.2, 0.69),
        findings=[FindingResult(lbl, p, 0.5) for lbl, p in zip(LABELS, probs, strict=True)],
        model1_algorithm=AlgorithmInfo("m1", "1.0", "a" * 64),
        model2_algorithm=AlgorithmInfo("m2", "2.0", "b" * 64),
        lung_mask_algorithm=AlgorithmInfo("mask", "1.0", "c" * 64),
        crop=CropInfo(cols // 10, rows // 8, cols * 9 // 10, rows * 7 // 8),
        mask_quality=MaskQualityInfo(0.3, 2, 0.9, True),
        regions={LABELS[i]: _box(i, cols) for i in range(n_present)},
        ctr=ctr,
    )


CTR = CtrInfo(0.47, LineInfo(380.0, 700.5, 640.0, 700.5), LineInfo(150.0, 650.5, 880.0, 650.5))


@pytest.mark.parametrize(("n_present", "ctr"), [(0, None), (3, None), (14, CTR)])
def test_dcmjs_reads_the_report(tmp_path: Path, n_present: int, ctr: CtrInfo | None) -> None:
    frontal = pydicom.dcmread(DATA / "siim_cr_pa_secondary_capture.dcm", stop_before_pixels=True)
    path = write_report(build_report(_report_input(frontal, n_present, ctr)), tmp_path / "sr.dcm")
    out = run_node("dcmjs_sr.mjs", str(path))
    assert out["ok"], out
    assert out["template"] == "1500" and out["sopClassUID"] == pydicom.uid.EnhancedSRStorage
    # Model 1's decision (on the lung box) and every Present finding, each a rectangle
    assert out["count"] == 1 + n_present and out["toolState"] == {"RectangleROI": 1 + n_present}
    described = [m["description"] for m in out["measurements"]]
    assert (
        described == ["Abnormal"] + [codes.finding_code(lbl).meaning for lbl in LABELS][:n_present]
    )
    box = [m["points"] for m in out["measurements"]][0]
    assert {p[0] for p in box} == {frontal.Columns // 10 - 0.5, frontal.Columns * 9 // 10 - 0.5}
    # the adapter has no reader for a measured line that Cornerstone did not write itself: it
    # skips the ratio's group with a warning (OHIF still draws both lines: see the next test)
    assert out["measurementGroups"] == 1 + n_present + (ctr is not None)
    assert len(out["warnings"]) == (ctr is not None)


def test_ohif_draws_the_cardiothoracic_ratio(tmp_path: Path) -> None:
    frontal_path = DATA / "siim_cr_pa_secondary_capture.dcm"
    frontal = pydicom.dcmread(frontal_path, stop_before_pixels=True)
    report = tmp_path / "ctr.dcm"
    write_report(build_report(_report_input(frontal, 2, CTR)), report)
    findings = read_findings(report)
    present = [f for f in findings if f.present or f.model == "Model 1"]
    absent = [f for f in findings if not f.present and f.model == "Model 2"]
    with (
        Orthanc.start(tmp_path / "orthanc", dicomweb=True) as pacs,
        OhifServer.start(pacs.url) as ohif,
    ):
        pacs.upload(frontal_path)
        pacs.upload(report)
        shot = tmp_path / "ohif_sr_ctr.png"
        expected = [drawn_label(f) for f in present] + [
            "Cardiothoracic ratio: 0.47",
            "Cardiac width: 43.68 mm",  # 260 px x 0.168 mm
            "Thoracic width: 122.64 mm",
        ]
        page = run_node(
            "ohif_sr.mjs",
            ohif.viewer_url(str(frontal.StudyInstanceUID)),
            SR_SERIES,
            str(shot),
            *expected,
            check=False,
        )
        _keep(shot, "ohif_sr_ctr.png")
        _check_page(page, present, absent)
    assert _viewport_shows_an_image(shot) > 20
