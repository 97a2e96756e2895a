"""worker.results: the report and the key image are made from one StudyResult and say the same.

A real frontal image (the SIIM chest radiograph) with a model analysis built here: Present and
Absent findings with their own thresholds, heat maps for the Present ones, a rejected lung mask
with its failing check and a cardiothoracic ratio. The test reads the written report back
(highdicom) and the key image's DICOM, and compares them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from db.records import ClaimedStudy, InstanceRow
from dicom_node.derived import DeviceInfo
from dicom_node.key_image import build_key_image, listed_present, write_key_image
from dicom_node.pixels import load_image
from dicom_node.sr import build_report, read_findings, write_report
from dicom_node.sr_read import read_summary
from dicom_node.views import ViewGuess
from models.api import (
    CardiothoracicRatio,
    CropBox,
    Finding,
    Heatmap,
    LineSegment,
    LungMaskResult,
    MaskQuality,
    ModelInfo,
    ModelKind,
    StudyAnalysis,
)
from worker.results import PreparedStudy, StudyResult

LABELS = ["No Finding", "Cardiomegaly", "Edema", "Pneumothorax", "Pleural Effusion", "Fracture"]
PROBS = [0.10, 0.71, 0.20, 0.93, 0.64, 0.05]
THRESHOLDS = [0.50, 0.60, 0.45, 0.40, 0.55, 0.30]


def _blob(shape: tuple[int, int], cy: float, cx: float, s: float) -> np.ndarray:
    """A Grad-CAM-like map: uint8, 255 at (cy, cx)."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    g = np.exp(-(((yy - cy) / s) ** 2 + ((xx - cx) / s) ** 2))
    return np.asarray(np.round(255 * g / g.max()), dtype=np.uint8)


@pytest.fixture
def result(data_dir: Path) -> StudyResult:
    path = data_dir / "siim_cr_pa_secondary_capture.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    pixels = load_image(path).pixels
    h, w = pixels.shape
    mask = np.zeros((h, w), np.uint8)
    mask[h // 5 : h * 4 // 5, w // 8 : w * 7 // 16] = 1
    mask[h // 5 : h * 4 // 5, w * 9 // 16 : w * 7 // 8] = 1
    now = datetime.now(UTC)
    inst = InstanceRow(
        1, str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.SeriesInstanceUID),
        "1.2.840.10008.1.2.1", "CR", "CHEST", "PA", "frontal", "x.dcm", 1, True, None, "PACS", now,
    )  # fmt: skip
    claimed = ClaimedStudy(7, str(ds.StudyInstanceUID), 1, None, now, [inst])
    prepared = PreparedStudy(
        claimed=claimed,
        frontal_ds=ds,
        frontal_pixels=pixels,
        lateral_ds=None,
        lateral_pixels=None,
        views={str(ds.SOPInstanceUID): "frontal PA (ViewPosition)"},
        frontal_view=ViewGuess("frontal", "PA", "ViewPosition", 1.0),
        lateral_view=None,
    )
    model2 = [Finding(lbl, p, t) for lbl, p, t in zip(LABELS, PROBS, THRESHOLDS, strict=True)]
    # at the model's resolution, each over the box of the frontal image the model saw
    left, right = CropBox(0, 0, w // 2, h), CropBox(w // 4, h // 2, w, h)
    heat = {
        "Cardiomegaly": Heatmap(_blob((64, 64), 40, 32, 9), CropBox(0, 0, w, h)),
        "Pneumothorax": Heatmap(_blob((320, 160), 320 * 0.3, 160 * 0.6, 320 / 12), left),
        "Pleural Effusion": Heatmap(_blob((160, 240), 160 * 0.4, 240 * 2 / 3, 160 / 7), right),
    }
    analysis = StudyAnalysis(
        key="7",
        lung_mask=LungMaskResult(
            mask,
            CropBox(0, 0, w, h),
            MaskQuality(
                0.64, 1, 0.12, False, "the mask touches the image border", "touches_border"
            ),
        ),
        model1=Finding("Abnormal", 0.88, 0.69),
        model2=model2,
        models=[
            ModelInfo("m1", "1.0", "a" * 64, "densenet121", ModelKind.MODEL1),
            ModelInfo("m2", "2.0", "b" * 64, "densenet121", ModelKind.MODEL2),
            ModelInfo("mask", "1.0", "c" * 64, "pix2pix", ModelKind.LUNG_MASK),
        ],
        used_lateral=False,
        heatmaps=heat,
        ctr=CardiothoracicRatio(
            0.52, LineSegment(400, 620.5, 660, 620.5), LineSegment(150, 560.5, 650, 560.5)
        ),
    )
    return StudyResult(prepared, analysis, DeviceInfo(version="9.9.9"))


def test_report_and_key_image_tell_the_same_story(result: StudyResult, tmp_path: Path) -> None:
    report = result.report_input()
    sr = build_report(report)
    sr_path = write_report(sr, tmp_path / "sr.dcm")
    key = build_key_image(result.key_image_input(str(sr.SOPInstanceUID), report.instance_number))
    key_path, _ = write_key_image(key, tmp_path / "key.dcm", tmp_path / "key.png")
    key_ds = pydicom.dcmread(key_path)

    found = read_findings(sr_path)
    present = [f for f in found if f.model == "Model 2" and f.present]
    expected = [lbl for lbl, p, t in zip(LABELS, PROBS, THRESHOLDS, strict=True) if p >= t]
    assert (
        [f.label for f in present]
        == expected
        == ["Cardiomegaly", "Pneumothorax", "Pleural Effusion"]
    )
    # the key image lists exactly the report's Present findings, with the same numbers
    assert [f.label for f in key.listed] == [f.label for f in present]
    assert listed_present(key_ds) == [f.label for f in present]
    for f, k in zip(present, key.listed, strict=True):
        assert (f.probability, f.threshold) == (round(k.probability, 6), round(k.threshold, 6))
        assert (
            f"{k.label} p={k.probability:.2f} (threshold {k.threshold:.2f})" in key_ds.ImageComments
        )
    # the report marks each one where its heat map is hot: the boxes the key image numbers
    for f in present:
        box = result.regions[f.label]
        assert f.region == (box.x0, box.y0, box.x1, box.y1)
    assert result.regions["Pneumothorax"].x1 < result.regions["Pleural Effusion"].x0
    # Model 1, the QC state with its failing check, the ratio: the same words on both
    summary = read_summary(sr_path)
    assert "Model 1 (m1 1.0): ABNORMAL, p=0.88 (threshold 0.69)." in summary
    assert "Model 1: ABNORMAL p=0.88 (threshold 0.69)." in key_ds.ImageComments
    state = "REJECTED (touches_border: the mask touches the image border)"
    assert f"Lung mask QC: {state}; the full image was analysed." in summary
    assert f"Lung mask QC: {state}." in key_ds.ImageComments
    assert "Cardiothoracic ratio: 0.52." in summary
    assert "Cardiothoracic ratio: 0.52." in key_ds.ImageComments
    # one product identity and numbering on both
    for ds in (pydicom.dcmread(sr_path), key_ds):
        assert ds.ManufacturerModelName == "cxr-pacs-worker" and ds.SoftwareVersions == "9.9.9"
        assert ds.InstanceNumber == report.instance_number == 1
        assert ds.SeriesDate and ds.SeriesTime
    payload = result.payload(sr_path, tmp_path / "key.png")
    assert payload["mask_quality"]["rule"] == "touches_border"
    assert payload["ctr"]["ratio"] == pytest.approx(0.52)
    assert sorted(payload["regions"]) == sorted(f.label for f in present)


def test_uninterpretable_ratio_is_reported_as_such(result: StudyResult) -> None:
    c = result.analysis.ctr
    assert c is not None
    result.analysis.ctr = CardiothoracicRatio(c.ratio, c.cardiac, c.thoracic, False, "AP film")
    report = result.report_input()
    key = build_key_image(result.key_image_input("2.25.1"))
    line = "Cardiothoracic ratio not reported: AP film."
    assert line in read_summary(build_report(report))
    assert line in key.dataset.ImageComments


def test_regions_are_placed_by_the_maps_boxes(result: StudyResult) -> None:
    """A model-resolution map marks its finding in the frontal image's pixels: around the hot
    spot of the map, placed by the box the model saw (not in the map's own pixel grid)."""
    h, w = result.prepared.frontal_pixels.shape
    expect = {  # where each test map peaks, in frontal pixels
        "Pneumothorax": (0.6 * (w // 2), 0.3 * h),
        "Pleural Effusion": (w // 4 + (w - w // 4) * 2 / 3, h // 2 + (h - h // 2) * 0.4),
        "Cardiomegaly": (32 / 64 * w, 40 / 64 * h),
    }
    for label, (cx, cy) in expect.items():
        box = result.regions[label]
        assert box.x0 < cx < box.x1 and box.y0 < cy < box.y1, (label, box, cx, cy)
        assert (box.x1 - box.x0) < w / 3 and (box.y1 - box.y0) < h / 3, (label, box)
    # the key image gets the same uint8 maps and boxes, never a full-resolution copy
    key_in = result.key_image_input("2.25.1")
    for label, heat in result.analysis.heatmaps.items():
        mine = key_in.heatmaps[label]
        assert mine.values is heat.values and mine.values.dtype == np.uint8
        b = heat.box
        assert mine.box is not None and (mine.box.x0, mine.box.y0, mine.box.x1, mine.box.y1) == (
            b.x0, b.y0, b.x1, b.y1,
        )  # fmt: skip
