"""dicom_node.derived: deterministic UIDs, the checked records, header copies, the atomic write."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node import derived
from dicom_node.derived import AlgorithmInfo, CropInfo, DeviceInfo, FindingResult

M1 = AlgorithmInfo("cxr-model1", "1.2.0", "a" * 64, "densenet121")


def test_deterministic_uid_is_a_valid_2_25_uid() -> None:
    uid = derived.deterministic_uid("a", "b")
    assert uid == derived.deterministic_uid("a", "b") != derived.deterministic_uid("a", "c")
    assert uid.startswith("2.25.") and pydicom.uid.UID(uid).is_valid
    assert derived.deterministic_uid("ab") != derived.deterministic_uid("a", "b")


def test_series_uids_per_study_and_device() -> None:
    dev = DeviceInfo()
    assert derived.report_series_uid("1.2.3", dev) == derived.report_series_uid("1.2.3", dev)
    assert derived.report_series_uid("1.2.3", dev) != derived.report_series_uid("1.2.4", dev)
    assert derived.report_series_uid("1.2.3", dev) != derived.key_image_series_uid("1.2.3", dev)
    other = DeviceInfo(ae_title="OTHER")
    assert derived.report_series_uid("1.2.3", dev) != derived.report_series_uid("1.2.3", other)


@pytest.mark.parametrize("value", [-0.01, 1.01, 50.0, math.nan])
def test_finding_probability_outside_0_1_says_so(value: float) -> None:
    with pytest.raises(
        ValueError, match=r"Edema probability = .* is not a probability in \[0, 1\]"
    ):
        FindingResult("Edema", value, 0.5)
    with pytest.raises(ValueError, match="Edema threshold"):
        FindingResult("Edema", 0.5, value)


def test_finding_accepts_numpy_numbers_and_bounds() -> None:
    f = FindingResult("Edema", np.float32(0.25), np.float64(0.25))  # type: ignore[arg-type]
    assert f.present
    assert not FindingResult("Edema", 0.0, 1.0).present


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("", 0.5, 0.5), ValueError, "label is empty"),
        (("  ", 0.5, 0.5), ValueError, "label is empty"),
        ((None, 0.5, 0.5), TypeError, "label must be a str"),
        (("Edema", "0.5", 0.5), TypeError, "Edema probability must be a number"),
        (("Edema", True, 0.5), TypeError, "Edema probability must be a number"),
    ],
)
def test_finding_rejects_bad_types(args: tuple[object, ...], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        FindingResult(*args)  # type: ignore[arg-type]


def test_records_reject_wrong_types() -> None:
    with pytest.raises(TypeError, match="AlgorithmInfo.sha256 must be a str"):
        AlgorithmInfo("m", "1", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="DeviceInfo.ae_title must be a str"):
        DeviceInfo(ae_title=7)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CropInfo.x1 must be an integer"):
        CropInfo(0, 0, 1.5, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="CropInfo.y0 = -1 must be at least 0"):
        CropInfo(0, -1, 2, 2)
    with pytest.raises(ValueError, match="x1/y1 must not be left of/above x0/y0"):
        CropInfo(5, 0, 4, 2)
    assert CropInfo(np.int64(1), 2, 3, 4).x0 == 1  # type: ignore[arg-type]


def test_report_uid_is_order_independent() -> None:
    m2 = AlgorithmInfo("cxr-model2", "2.0.1", "b" * 64)
    assert derived.report_uid(["1.2", "1.3"], [M1, m2]) == derived.report_uid(
        ["1.3", "1.2"], [m2, M1]
    )
    newer = AlgorithmInfo(M1.name, "1.2.1", M1.sha256)
    assert derived.report_uid(["1.2"], [M1]) != derived.report_uid(["1.2"], [newer])


def test_check_same_patient_and_study_names_no_values() -> None:
    a, b = Dataset(), Dataset()
    for ds, uid in ((a, "1.2.1"), (b, "1.2.2")):
        ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID = "P-SECRET", "1.2", uid
    derived.check_same_patient_and_study([a, b])
    b.PatientID = "OTHER-SECRET"
    with pytest.raises(ValueError, match="1.2.1 and 1.2.2 have different PatientID") as info:
        derived.check_same_patient_and_study([a, b])
    assert "SECRET" not in str(info.value)
    with pytest.raises(ValueError, match="at least the frontal image"):
        derived.check_same_patient_and_study([])


def test_source_header_drops_pixels_and_fills_type2(data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "siim_cr_pa_secondary_capture.dcm")
    header = derived.source_header(ds)
    assert "PixelData" not in header and "PixelData" in ds
    for kw in derived.TYPE2_PATIENT_STUDY:
        assert kw in header
    assert header.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


def test_sanitize_repairs_age_empties_type2_drops_others() -> None:
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.PatientID = "x" * 80  # identity: never touched, even when too long
    ds.PatientAge = "62"
    ds.StudyDate = "not-a-date"
    ds.ContentDate = "2024-13-45"
    derived.sanitize_copied_attributes(ds)
    assert ds.PatientAge == "062Y"
    assert ds.StudyDate == ""
    assert "ContentDate" not in ds
    assert ds.PatientID == "x" * 80


def test_atomic_write_dataset_and_bytes(tmp_path: Path, data_dir: Path) -> None:
    ds = pydicom.dcmread(data_dir / "siim_cr_pa_secondary_capture.dcm")
    out = derived.atomic_write(ds, tmp_path / "a" / "b" / "x.dcm")
    assert out == tmp_path / "a" / "b" / "x.dcm"
    assert pydicom.dcmread(out).SOPInstanceUID == ds.SOPInstanceUID
    png = derived.atomic_write(b"\x89PNG", tmp_path / "x.png")
    assert png.read_bytes() == b"\x89PNG"
    derived.atomic_write(b"new", png)  # replaces
    assert png.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["x.dcm", "x.png"]


def test_hot_region_is_the_largest_hot_area_in_image_pixels() -> None:
    heat = np.zeros((64, 64), np.float32)
    heat[10:20, 5:15] = 1.0  # the larger hot spot
    heat[40:44, 50:54] = 0.9  # a smaller one, also above the level
    box = derived.hot_region(heat, (640, 320))  # the map is 10x (rows) and 5x (cols) smaller
    assert box == CropInfo(25, 100, 75, 200)
    # a low-resolution Gaussian lands around its centre in the full-size image
    yy, xx = np.mgrid[0:32, 0:32]
    gauss = np.exp(-(((yy - 8) / 3.0) ** 2 + ((xx - 24) / 3.0) ** 2))
    g = derived.hot_region(gauss, (1024, 1024))
    assert g is not None and g.x0 < 24 * 32 < g.x1 and g.y0 < 8 * 32 < g.y1
    assert (g.x1 - g.x0) < 300 and (g.y1 - g.y0) < 300


@pytest.mark.parametrize(
    "heat",
    [
        np.zeros((8, 8)),
        np.full((8, 8), 0.7),
        np.full((8, 8), np.nan),
        np.zeros(8),
        np.zeros((0, 4)),
    ],
)
def test_hot_region_of_nothing_is_none(heat: np.ndarray) -> None:
    assert derived.hot_region(heat, (100, 100)) is None


def test_mask_quality_state_names_the_failing_check() -> None:
    assert derived.MaskQualityInfo(0.3, 2, 0.9, True).state == "acceptable"
    bad = derived.MaskQualityInfo(
        0.7, 1, 0.1, False, "the mask touches the border", "touches_border"
    )
    assert bad.state == "REJECTED (touches_border: the mask touches the border)"
    assert derived.MaskQualityInfo(0.7, 1, 0.1, False).state == "REJECTED (no reason given)"
    with pytest.raises(TypeError, match="MaskQualityInfo.rule must be a str"):
        derived.MaskQualityInfo(0.7, 1, 0.1, False, "x", None)  # type: ignore[arg-type]


def test_ctr_record_is_checked_and_shown_only_when_interpretable() -> None:
    cardiac, thoracic = derived.LineInfo(1, 2, 11, 2), derived.LineInfo(0, 1, 20, 1)
    assert cardiac.length == 10.0
    assert derived.CtrInfo(0.5, cardiac, thoracic).shown
    assert not derived.CtrInfo(0.5, cardiac, thoracic, False, "AP film").shown
    with pytest.raises(ValueError, match="is not a ratio"):
        derived.CtrInfo(-0.1, cardiac, thoracic)
    with pytest.raises(TypeError, match="CtrInfo.cardiac must be a LineInfo"):
        derived.CtrInfo(0.5, (1, 2, 3, 4), thoracic)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="LineInfo.x1 = inf is not finite"):
        derived.LineInfo(0, 0, math.inf, 0)


def test_mask_quality_state_does_not_repeat_a_rule_the_reason_names() -> None:
    q = derived.MaskQualityInfo(
        0.7, 1, 0.1, False, "touches_border: the lungs reach the top", "touches_border"
    )
    assert q.state == "REJECTED (touches_border: the lungs reach the top)"
